"""The EdgeMoE benchmark's smoke run: every speed configuration runs in its own process and reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_edge_offload_quick_speed_table(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/edge_offload.py"), "--quick", "--only", "speed",
                           "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())["speed"]["results"]
    assert list(results) == ["in memory", "on demand (no cache)", "LRU cache", "EdgeMoE",
                             "EdgeMoE, frequency/distance eviction", "EdgeMoE, packed cache",
                             "EdgeMoE, lookahead prediction"]
    for name, r in results.items():
        assert r["decode_tokens_per_second"] > 0 and r["peak_rss"] > r["runtime_rss"] > 0, name
    assert results["in memory"]["bytes_read"] == 0
    demand = results["on demand (no cache)"]
    assert demand["hit_rate"] == 0 and demand["bytes_read"] > 0  # every routed expert read from the store
    assert "| EdgeMoE |" in (tmp_path / "results.md").read_text()

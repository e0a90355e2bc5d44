"""The experiments' smoke runs, each run once per test session and shared: the experiment's own test reads
its outputs, and the report's test draws its figures from the same directories (`report --reuse`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


class QuickOutputs:
    """`get(name)`: the directory of `python -m lightning_moe.experiments.<name> --quick`, run on first use
    (`root/<name>`, the layout `report --reuse root` reads); `console[name]`: what the run printed."""

    def __init__(self, root: Path) -> None:
        self.root, self.console = root, {}

    def get(self, name: str) -> Path:
        out = self.root / name
        if not (out / "results.json").is_file():
            # as a user runs it, in its own process (the console is part of what the tests check)
            command = [sys.executable, "-m", f"lightning_moe.experiments.{name}", "--out", str(out), "--quick",
                       "--threads", "1", "--seeds", "0"]
            env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
            finished = subprocess.run(command, cwd=self.root, env=env, capture_output=True, text=True, timeout=900)
            self.console[name] = finished
            assert finished.returncode == 0, (finished.stdout + finished.stderr)[-3000:]
        return out


@pytest.fixture(scope="session")
def quick_outputs(tmp_path_factory) -> QuickOutputs:
    return QuickOutputs(tmp_path_factory.mktemp("quick_experiments"))

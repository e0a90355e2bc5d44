"""The layering rule of DESIGN.md for `lightning_moe/inference/`: it imports models/, layers/ and the
shared `tokens` module, never Lightning, torchmetrics, data/, metrics/, methods/ or callbacks/ (the
command layer that reads datasets is `lightning_moe/edge.py`, outside the package)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning_moe.inference
from tests.conftest import ROOT

FORBIDDEN = ("lightning", "pytorch_lightning", "torchmetrics", "lightning_moe.data", "lightning_moe.methods",
             "lightning_moe.metrics", "lightning_moe.callbacks", "lightning_moe.cli", "lightning_moe.edge")


def _forbidden(name: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN)


def test_importing_inference_loads_no_lightning_data_metrics_or_methods():
    # a fresh interpreter: this test process has imported everything already
    code = "import json, sys, lightning_moe.inference; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert "lightning_moe.inference.offload" in loaded  # the import did run
    assert [m for m in loaded if _forbidden(m)] == []


def test_no_inference_file_imports_a_forbidden_layer_even_lazily():
    # the subprocess test sees module-level imports only; an import inside a function shows up here
    package = Path(lightning_moe.inference.__file__).parent
    for file in package.glob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level == 2:  # `from ..x import y` is lightning_moe.x; `from .. import data` is lightning_moe.data
                    names = [f"lightning_moe.{module}"] if module else [f"lightning_moe.{a.name}" for a in node.names]
                else:
                    names = [module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                assert not _forbidden(name), f"{file.name} imports {name}"

"""The experiments' smoke runs, each run once per test session and shared: the experiment's own test reads
its outputs, and the report's test draws its figures from the same directories (`report --reuse`)."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


class QuickOutputs:
    """`get(name)`: the directory of `python -m lightning_moe.experiments.<name> --quick`, run on first use
    (`root/<name>`, the layout `report --reuse root` reads); `console(name)`: what the run printed.

    Under pytest-xdist every worker has this fixture, so the runs are shared through the file system: a lock per
    experiment lets one worker run it while the others wait for its outputs, never a second run."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def get(self, name: str) -> Path:
        out = self.root / name
        with open(self.root / f"{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if the run fails
            if not (out / "results.json").is_file():
                # as a user runs it, in its own process (the console is part of what the tests check)
                command = [sys.executable, "-m", f"lightning_moe.experiments.{name}", "--out", str(out), "--quick",
                           "--threads", "1", "--seeds", "0"]
                env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
                finished = subprocess.run(command, cwd=self.root, env=env, capture_output=True, text=True, timeout=900)
                (self.root / f"{name}.console.json").write_text(json.dumps(
                    {"returncode": finished.returncode, "stdout": finished.stdout, "stderr": finished.stderr}))
                assert finished.returncode == 0, (finished.stdout + finished.stderr)[-3000:]
        return out

    def console(self, name: str) -> subprocess.CompletedProcess:
        """The finished run of `name` (returncode, stdout, stderr), whichever worker ran it."""
        self.get(name)
        saved = json.loads((self.root / f"{name}.console.json").read_text())
        return subprocess.CompletedProcess([name], saved["returncode"], saved["stdout"], saved["stderr"])


@pytest.fixture(scope="session")
def quick_outputs(tmp_path_factory) -> QuickOutputs:
    base = tmp_path_factory.getbasetemp()
    # under xdist each worker's base is <session dir>/popen-gw<N>: the session directory is the shared one
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    return QuickOutputs(shared / "quick_experiments")

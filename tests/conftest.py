"""Shared test fixtures: one small CPU configuration every test reuses (tiny widths, no workers)."""

from __future__ import annotations

import fcntl
import io
import json
import os
import shutil
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from importlib import import_module
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = str(ROOT / "data" / "tokenizer")

# Smaller than the quickstart preset: tests need shapes, not learning.
TINY_LLM = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
TINY_WHISPER = dict(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
                    max_source_positions=20)  # 40 log-mel frames per window
QUERIES = 3  # the audio query connector's queries per window


def tiny_encoders(feature_layer: int = -2, audio: bool = False, video: str | None = None) -> dict[str, dict]:
    """The `encoders` (of `build_multimodal`, `BackboneConfig`) of the tests' small models: the tiny CLIP tower
    (`TINY_VISION`) read at `feature_layer` with LLaVA's projector; with `audio`, a tiny Whisper tower
    (`TINY_WHISPER`) and a one-layer query connector of `QUERIES` queries; with `video` ("mean" | "concat"), video
    through the image tower, pooled so."""
    encoders = {"image": {"tower": "tiny-clip", "overrides": dict(TINY_VISION), "feature_layer": feature_layer}}
    if audio:
        encoders["audio"] = {"tower": "tiny-whisper", "overrides": dict(TINY_WHISPER),
                             "connector_options": {"num_queries": QUERIES, "num_layers": 1, "num_heads": 2}}
    if video:
        encoders["video"] = {"pooling": video}
    return encoders


# `make test` runs one pytest-xdist worker per core: torch's default of one thread per core in every worker
# would oversubscribe the CPU (tests that depend on the thread count set it themselves)
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


# Logits compared with ones stored by another run (tests/fixtures/pre_restructure/, marked `stored_numbers`): on
# another CPU (another SIMD width, ATEN_CPU_CAPABILITY) or thread count each float32 sum is added up in another
# order, and a sum of n terms of size s is exact only to about n * eps * s (eps = 2**-23, about 1.2e-7). The
# fixtures' longest sums have 64 terms (the MLP width) and their logits stay below 1, so a logit may move by up to
# about 64 * 1.2e-7 = 7.7e-6: within 1e-5 (measured: at most 2.4e-7 across ATEN_CPU_CAPABILITY and thread counts,
# and the stored logits are 2.4e-7 from a float64 run). A misread weight moves them by more: the head's first
# weight off by 1e-3 by ~1e-3; an adapter tensor of the MoRA fixture off by 1e-3 by 4e-6 (a query's: the softmax
# damps it) to 5e-3.
STORED_LOGITS_ATOL = 1e-5


def assert_close_to_stored(actual: torch.Tensor, stored: torch.Tensor) -> None:
    torch.testing.assert_close(actual, stored, rtol=0, atol=STORED_LOGITS_ATOL)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tokenizer():
    from lightning_moe.tokens import load_tokenizer

    return load_tokenizer(TOKENIZER)


@pytest.fixture
def in_repo_root(monkeypatch):
    """Configs name paths relative to the repository root, as users run them."""
    monkeypatch.chdir(ROOT)
    return ROOT


def session_directory(tmp_path_factory) -> Path:
    """The test session's temporary directory, shared by every xdist worker (each worker's own base temporary
    directory is <session dir>/popen-gw<N>)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_once(tmp_path_factory, name: str, build) -> Path:
    """`build(directory)` run once per test session whichever worker asks first, the others waiting for it and
    reusing its files: for session fixtures whose tests land on both xdist workers (each would build its own)."""
    root = session_directory(tmp_path_factory) / "built_once"
    root.mkdir(exist_ok=True)
    directory, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if the build fails
        if not done.is_file():
            shutil.rmtree(directory, ignore_errors=True)  # a failed build's leftovers
            directory.mkdir()
            build(directory)
            done.touch()
    return directory


class QuickOutputs:
    """`get(name)`: the directory of a smoke run, run on first use: `lightning_moe.experiments.<name>.main([...,
    "--quick"])` in this process (what `python -m lightning_moe.experiments.<name> --quick` runs, without a fresh
    interpreter's seconds of imports) or, for a name in BENCHMARKS, `python benchmarks/<name>.py --quick` in a
    process of its own (`root/<name>`, the layout `report --reuse root` reads); `console(name)`: what the run
    printed. The experiment's (or benchmark's) own test reads its outputs, and the report's test draws its
    figures from the same directories.

    Under pytest-xdist every worker has this fixture, so the runs are shared through the file system: a lock per
    run lets one worker run it while the others wait for its outputs, never a second run."""

    BENCHMARKS = ("moe_layer",)

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def get(self, name: str) -> Path:
        out = self.root / name
        with open(self.root / f"{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if the run fails
            if not (out / "results.json").is_file():
                finished = self._benchmark(name, out) if name in self.BENCHMARKS else self._experiment(name, out)
                (self.root / f"{name}.console.json").write_text(json.dumps(
                    {"returncode": finished.returncode, "stdout": finished.stdout, "stderr": finished.stderr}))
                assert finished.returncode == 0, (finished.stdout + finished.stderr)[-3000:]
        return out

    def _benchmark(self, name: str, out: Path) -> subprocess.CompletedProcess:
        command = [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--quick", "--out", str(out)]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        return subprocess.run(command, cwd=self.root, env=env, capture_output=True, text=True, timeout=900)

    def _experiment(self, name: str, out: Path) -> subprocess.CompletedProcess:
        argv = ["--out", str(out), "--quick", "--threads", "1", "--seeds", "0"]
        stdout, stderr = io.StringIO(), io.StringIO()
        cwd, threads = Path.cwd(), torch.get_num_threads()
        os.chdir(self.root)
        try:
            with redirect_stdout(stdout), redirect_stderr(stderr):
                import_module(f"lightning_moe.experiments.{name}").main(argv)
        finally:  # what --threads and the runs change in this process
            os.chdir(cwd)
            torch.set_num_threads(threads)
        return subprocess.CompletedProcess([name, *argv], 0, stdout.getvalue(), stderr.getvalue())

    def console(self, name: str) -> subprocess.CompletedProcess:
        """The finished run of `name` (returncode, stdout, stderr), whichever worker ran it."""
        self.get(name)
        saved = json.loads((self.root / f"{name}.console.json").read_text())
        return subprocess.CompletedProcess([name], saved["returncode"], saved["stdout"], saved["stderr"])


@pytest.fixture(scope="session")
def quick_outputs(tmp_path_factory) -> QuickOutputs:
    return QuickOutputs(session_directory(tmp_path_factory) / "quick_experiments")


def pytest_collection_modifyitems(config, items):
    """Tests marked `slow` run first (in collection order; the rest keep theirs), tests marked `last` after all
    others. Under `make test` (pytest-xdist, `--dist loadgroup`, which hands out one test at a time) a long test
    handed out last would run alone while the other worker idles; handed out first, the short tests fill in around
    it. A `last` test reuses what the others made (the report's test draws from the experiments' shared smoke
    runs): handed out at the end, it finds them done instead of running them or waiting on the worker that does."""
    def order(item) -> int:
        return 2 if item.get_closest_marker("last") else 0 if item.get_closest_marker("slow") else 1

    items.sort(key=order)  # stable: each group keeps its collection order

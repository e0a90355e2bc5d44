"""Helpers of the multi-process tests: train on 2 CPU processes (gloo, launched as torchrun does, each running
tests/distributed/ddp_worker.py), then train one process on the same global batch and compare the weights.

One process with `accumulate_grad_batches=2` sees the same micro-batches as the two ranks (the training sampler
shards each global batch into contiguous per-rank blocks, data/sampler.py), and the data-parallel gradient
average equals the accumulated mean, so the weights after a few optimizer steps agree up to float summation order.

`RecordBatches` (a callback named on a run's command line) writes what each rank trained on at each step, which
the resume tests compare between a resumed run and the run that was not interrupted.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch

from lightning_moe.cli import main
from tests.conftest import ROOT, TINY_LLM, tiny_encoders

STEPS = 2
COMMON = [f"--trainer.max_steps={STEPS}", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
          "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu",
          "--trainer.enable_model_summary=false", "--data.init_args.batch_size=2", "--trainer.gradient_clip_val=1.0"]
TINY = [f"--model.init_args.backbone.llm_overrides={json.dumps(TINY_LLM)}",
        f"--model.init_args.backbone.encoders={json.dumps(tiny_encoders(-1))}"]  # quickstart's, smaller


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_on_two_processes(module: str, argv: list[str], cwd: Path) -> None:
    """`python -m module *argv` as ranks 0 and 1 of one gloo group (environment as torchrun sets it); fails with
    the ranks' output when either fails."""
    port = _free_port()
    procs = []
    for rank in range(2):
        # PYTHONFAULTHANDLER: a rank that dies of a signal prints where it was
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONFAULTHANDLER": "1", "OMP_NUM_THREADS": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "NODE_RANK": "0",
               "RANK": str(rank), "LOCAL_RANK": str(rank)}
        procs.append(subprocess.Popen([sys.executable, "-m", module, *argv],
                                      cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)


def train_on_two_processes(runs: list[list[str]], out: Path, cwd: Path) -> None:
    """Each run's CLI arguments on 2 ranks; rank 0 writes run i's trainable weights to out/i.pt."""
    out.mkdir()
    run_on_two_processes("tests.distributed.ddp_worker", [str(out), json.dumps(runs)], cwd)


def train_on_one_process(args: list[str]) -> dict:
    """A config's CLI arguments on one process, `accumulate_grad_batches=2`: its trainable weights and global step,
    as a rank writes them."""
    single = main(args + COMMON + ["--trainer.devices=1", "--trainer.accumulate_grad_batches=2"])
    state = {n: p.detach() for n, p in single.model.named_parameters() if p.requires_grad}
    return {"state": state, "global_step": single.trainer.global_step}


def assert_trains_the_same(multi: dict, single: dict, label: str) -> None:
    """A 2-process run's weights (out/i.pt) are the 1-process run's; `label` names the config and strategy."""
    steps = multi["global_step"], single["global_step"]
    assert steps == (STEPS, STEPS), f"{label}: global steps (2 processes, 1 process) {steps}, not {STEPS}"
    differ = sorted(multi["state"].keys() ^ single["state"].keys())
    assert not differ, f"{label}: trainable on one side only: {differ}"
    for key, value in single["state"].items():
        torch.testing.assert_close(multi["state"][key], value, rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{label}: {key}: {m}")


class RecordBatches(L.Callback):
    """Each rank appends, per training step, its batch's sample ids and its loss to `{prefix}.{rank}.jsonl`."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        line = {"step": trainer.global_step - 1, "ids": batch["id"], "loss": outputs["loss"].item()}
        with open(f"{self.prefix}.{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")


def record_batches(prefix: Path) -> list[str]:
    """The CLI arguments that add `RecordBatches(prefix)` to a run's callbacks."""
    return ["--trainer.callbacks+=" + json.dumps({"class_path": f"{__name__}.RecordBatches",
                                                  "init_args": {"prefix": str(prefix)}})]


def recorded_batches(prefix: Path) -> dict[int, dict[int, dict]]:
    """What `RecordBatches(prefix)` wrote: rank -> step -> {"ids", "loss"}."""
    return {rank: {line["step"]: {"ids": line["ids"], "loss": line["loss"]}
                   for line in map(json.loads, Path(f"{prefix}.{rank}.jsonl").read_text().splitlines())}
            for rank in range(2)}

"""Helpers of the multi-process tests: train on 2 CPU processes (gloo, launched as torchrun does, each running
tests/distributed/ddp_worker.py), then train one process on the same global batch and compare the weights.

One process with `accumulate_grad_batches=2` sees the same micro-batches as the two ranks (the training sampler
shards each global batch into contiguous per-rank blocks, data/sampler.py), and the data-parallel gradient
average equals the accumulated mean, so the weights after a few optimizer steps agree up to float summation order.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from lightning_moe.cli import main
from tests.conftest import ROOT, TINY_LLM, TINY_VISION

STEPS = 2
COMMON = [f"--trainer.max_steps={STEPS}", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
          "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu",
          "--trainer.enable_model_summary=false", "--data.init_args.batch_size=2", "--trainer.gradient_clip_val=1.0"]
TINY = [f"--model.init_args.backbone.llm_overrides={json.dumps(TINY_LLM)}",
        f"--model.init_args.backbone.vision_overrides={json.dumps(TINY_VISION)}"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_on_two_processes(runs: list[list[str]], out: Path, cwd: Path) -> None:
    """Each run's CLI arguments on 2 ranks; rank 0 writes run i's trainable weights to out/i.pt."""
    out.mkdir()
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "WORLD_SIZE": "2", "NODE_RANK": "0", "RANK": str(rank), "LOCAL_RANK": str(rank)}
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.distributed.ddp_worker", str(out), json.dumps(runs)],
                                      cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)


def assert_one_process_trains_the_same(configs: dict[str, list[str]], out: Path) -> None:
    """Run i of `configs` on one process, `accumulate_grad_batches=2`, has run i's 2-process weights (out/i.pt)."""
    for i, (name, args) in enumerate(configs.items()):
        single = main(args + COMMON + ["--trainer.devices=1", "--trainer.accumulate_grad_batches=2"])
        multi = torch.load(out / f"{i}.pt")
        assert multi["global_step"] == single.trainer.global_step == STEPS, name
        reference = {n: p.detach() for n, p in single.model.named_parameters() if p.requires_grad}
        assert reference.keys() == multi["state"].keys(), name
        for key, value in reference.items():
            torch.testing.assert_close(multi["state"][key], value, rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")

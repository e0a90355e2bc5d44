"""DDP on 2 CPU processes (gloo) trains the same weights as one process on the same global batch.

One process with `accumulate_grad_batches=2` sees the same micro-batches as the two ranks (the
training sampler shards each global batch into contiguous per-rank blocks, data/sampler.py), and
DDP's gradient average equals the accumulated mean, so the weights after a few optimizer steps agree
up to float summation order. This is also the check that every trainable parameter is used (DDP
raises otherwise: CLIP's `post_layernorm` once was). Quickstart (MoE), MoLE and MoD's sparse mimic
stage, with tiny widths; their upstream stages are replaced by a tiny saved model.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from lightning_moe.cli import main
from tests.conftest import ROOT, TINY_LLM, TINY_VISION

STEPS = 2
COMMON = [f"--trainer.max_steps={STEPS}", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
          "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu",
          "--trainer.enable_model_summary=false", "--data.init_args.batch_size=2", "--trainer.gradient_clip_val=1.0"]
TINY = [f"--model.init_args.backbone.llm_overrides={json.dumps(TINY_LLM)}",
        f"--model.init_args.backbone.vision_overrides={json.dumps(TINY_VISION)}"]


def runs(base: str) -> dict[str, list[str]]:
    """CLI arguments of each compared config (stage inputs point at one tiny saved model `base`)."""
    return {
        "quickstart": ["fit", "--config", str(ROOT / "configs/quickstart.yaml"), *TINY],
        "mole": ["fit", "--config", str(ROOT / "configs/mole/mole.yaml"), f"--model.init_args.backbone.pretrained={base}",
                 "--model.init_args.lora.dropout=0.0"],  # dropout draws differ between 1 and 2 processes
        "mod": ["fit", "--config", str(ROOT / "configs/mod/mimic_sparse.yaml"), f"--model.init_args.teacher={base}",
                f"--model.init_args.backbone.pretrained={base}"],
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, tokenizer):
    from lightning_moe.models import build_multimodal

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base") / "model"
    build_multimodal(tokenizer, "tiny-llama", TINY_LLM, "tiny-clip", TINY_VISION, -1).save_pretrained(path)
    return str(path)


@pytest.mark.slow  # two extra Python processes (imports, gloo) plus three reference runs: ~40 s on an idle 2-core machine
def test_ddp_on_two_cpu_processes_matches_one_process_on_the_same_global_batch(tiny_base, tmp_path, monkeypatch):
    configs = runs(tiny_base)
    out = tmp_path / "ddp"
    out.mkdir()
    ddp_args = [args + COMMON + ["--trainer.strategy=ddp", "--trainer.devices=2"] for args in configs.values()]
    port = _free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "WORLD_SIZE": "2", "NODE_RANK": "0", "RANK": str(rank), "LOCAL_RANK": str(rank)}
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.distributed.ddp_worker", str(out), json.dumps(ddp_args)],
                                      cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)

    monkeypatch.chdir(tmp_path)
    for i, (name, args) in enumerate(configs.items()):
        single = main(args + COMMON + ["--trainer.devices=1", "--trainer.accumulate_grad_batches=2"])
        ddp = torch.load(out / f"{i}.pt")
        assert ddp["global_step"] == single.trainer.global_step == STEPS, name
        reference = {n: p.detach() for n, p in single.model.named_parameters() if p.requires_grad}
        assert reference.keys() == ddp["state"].keys(), name
        for key, value in reference.items():
            torch.testing.assert_close(ddp["state"][key], value, rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")

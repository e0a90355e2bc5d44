"""DDP on 2 CPU processes (gloo) trains the same weights as one process on the same global batch
(why they should: tests/distributed/two_processes.py). This is also the check that every trainable parameter is used (DDP
raises otherwise: CLIP's `post_layernorm` once was). Quickstart (MoE), MoLE and MoD's sparse mimic
stage, with tiny widths; their upstream stages are replaced by a tiny saved model.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import ROOT, TINY_LLM, TINY_VISION
from tests.distributed.two_processes import COMMON, TINY, assert_one_process_trains_the_same, train_on_two_processes


def runs(base: str) -> dict[str, list[str]]:
    """CLI arguments of each compared config (stage inputs point at one tiny saved model `base`)."""
    return {
        "quickstart": ["fit", "--config", str(ROOT / "configs/quickstart.yaml"), *TINY],
        "mole": ["fit", "--config", str(ROOT / "configs/mole/mole.yaml"), f"--model.init_args.backbone.pretrained={base}",
                 "--model.init_args.lora.dropout=0.0"],  # dropout draws differ between 1 and 2 processes
        "mod": ["fit", "--config", str(ROOT / "configs/mod/mimic_sparse.yaml"), f"--model.init_args.teacher={base}",
                f"--model.init_args.backbone.pretrained={base}"],
    }


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
    ddp_args = [args + COMMON + ["--trainer.strategy=ddp", "--trainer.devices=2"] for args in configs.values()]
    train_on_two_processes(ddp_args, tmp_path / "ddp", tmp_path)
    monkeypatch.chdir(tmp_path)
    assert_one_process_trains_the_same(configs, tmp_path / "ddp")

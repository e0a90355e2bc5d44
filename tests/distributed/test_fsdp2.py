"""FSDP2 (Lightning's `ModelParallelStrategy`, configs/strategies/fsdp2.yaml) on 2 CPU processes (gloo) trains the
same weights as one process on the same global batch (why they should: tests/distributed/two_processes.py), and
its checkpoint is one ordinary file holding those weights. Quickstart (MoE) with tiny widths."""

from __future__ import annotations

import pytest
import torch

from lightning_moe.layers import SparseMoE
from tests.conftest import ROOT
from tests.distributed.two_processes import COMMON, TINY, assert_one_process_trains_the_same, train_on_two_processes

FSDP2 = ["--config", str(ROOT / "configs/strategies/fsdp2.yaml")]


@pytest.mark.slow  # two extra Python processes (imports, gloo) plus one reference run: ~40 s on a busy 2-core machine
def test_fsdp2_on_two_cpu_processes_matches_one_process_on_the_same_global_batch(tmp_path, monkeypatch):
    configs = {"quickstart": ["fit", "--config", str(ROOT / "configs/quickstart.yaml"), *TINY]}
    two = [args + FSDP2 + COMMON + ["--trainer.devices=2"] for args in configs.values()]
    train_on_two_processes(two, tmp_path / "fsdp2", tmp_path)
    multi = torch.load(tmp_path / "fsdp2" / "0.pt")["state"]
    # `save_distributed_checkpoint: false`: the last checkpoint is one file with the whole (gathered) model
    (checkpoint_file,) = (tmp_path / "runs").rglob("last.ckpt")
    saved = torch.load(checkpoint_file, weights_only=False)["state_dict"]
    for name, value in multi.items():
        torch.testing.assert_close(saved[name], value, msg=name)
    monkeypatch.chdir(tmp_path)
    assert_one_process_trains_the_same(configs, tmp_path / "fsdp2")


def test_shard_blocks_makes_one_unit_per_block_and_keeps_each_sparse_moe_whole(tokenizer, monkeypatch):
    """The FSDP2 plan on a 1-process gloo group: every transformer block and the root are `fully_shard` units,
    nothing else is, and each SparseMoE lies inside exactly one block unit."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule

    from lightning_moe.models import MoEConfig, build_multimodal, upcycle
    from lightning_moe.strategies import is_block, shard_blocks
    from tests.conftest import TINY_LLM, TINY_VISION
    from tests.distributed.two_processes import _free_port

    model = build_multimodal(tokenizer, "tiny-llama", TINY_LLM, "tiny-clip", TINY_VISION, -1)
    upcycle(model, MoEConfig(num_experts=4, top_k=2, layers="::1"))
    blocks = {name for name, m in model.named_modules() if is_block(m)}
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        sharded = shard_blocks(model, init_device_mesh("cpu", (1,)))
        assert shard_blocks(sharded, init_device_mesh("cpu", (1,))) is sharded  # a second call changes nothing
    finally:
        dist.destroy_process_group()
    units = {name for name, m in model.named_modules() if isinstance(m, FSDPModule)}
    assert units == blocks | {""} and len(blocks) == TINY_LLM["num_hidden_layers"] + TINY_VISION["num_hidden_layers"]
    moes = [name for name, m in model.named_modules() if isinstance(m, SparseMoE)]
    assert moes and all(sum(moe.startswith(unit + ".") for unit in blocks) == 1 for moe in moes)

"""FSDP2's sharding plan (lightning_moe/strategies.py: shard_blocks), checked on a 1-process gloo group. That FSDP2
(configs/strategies/fsdp2.yaml) on 2 CPU processes trains the same weights as one process, and that its checkpoint
is one ordinary file, is checked in test_data_parallel.py, in the same two-process launch as DDP."""

from __future__ import annotations

from lightning_moe.layers import SparseMoE


def test_shard_blocks_makes_one_unit_per_block_and_keeps_each_sparse_moe_whole(tokenizer, monkeypatch):
    """The FSDP2 plan on a 1-process gloo group: every transformer block and the root are `fully_shard` units,
    nothing else is, and each SparseMoE lies inside exactly one block unit."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule

    from lightning_moe.models import MoEConfig, build_multimodal, upcycle
    from lightning_moe.strategies import is_block, shard_blocks
    from tests.conftest import TINY_LLM, TINY_VISION, tiny_encoders
    from tests.distributed.two_processes import _free_port

    model = build_multimodal(tokenizer, "tiny-llama", TINY_LLM, tiny_encoders(-1))
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

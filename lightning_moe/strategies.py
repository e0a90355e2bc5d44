"""Wrap policies for sharded training through Lightning's strategies (configs/strategies/).

`decoder_layer_policy` is an FSDP `auto_wrap_policy`: each transformer block (the LLM's decoder
layers, the vision tower's encoder layers) becomes one FSDP unit, so a `SparseMoE` inside a layer
is sharded and gathered whole with its router, never split between units; embeddings, norms and
the connector stay in the root unit. Blocks are recognised by their Hugging Face class names
(`...DecoderLayer`, `...EncoderLayer`), so the policy works for any LLM family transformers builds.

`shard_blocks` is the same plan for FSDP2 (`torch.distributed.fsdp.fully_shard`, Lightning's
`ModelParallelStrategy`, configs/strategies/fsdp2.yaml): one `fully_shard` unit per block, then the root.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

BLOCK_SUFFIXES = ("DecoderLayer", "EncoderLayer")


def is_block(module: nn.Module) -> bool:
    """A transformer block: one FSDP unit."""
    return type(module).__name__.endswith(BLOCK_SUFFIXES)


def decoder_layer_policy(module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
    """FSDP's auto-wrap callable: descend everywhere, wrap every transformer block (module docstring)."""
    return True if recurse else is_block(module)


def shard_blocks(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """FSDP2: `fully_shard` every transformer block (`is_block`), then the root (embeddings, norms, connectors,
    everything outside a block), over the 1-D data-parallel `mesh`. A model already sharded is left as it is
    (Lightning calls `configure_model` again for each fit / validate / test on the same module)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(model, FSDPModule):
        return model
    for module in [m for m in model.modules() if is_block(m)]:  # listed first: sharding changes the classes
        fully_shard(module, mesh=mesh)
    return fully_shard(model, mesh=mesh)

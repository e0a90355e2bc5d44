"""Sharding plans for training through Lightning's strategies (configs/strategies/).

`decoder_layer_policy` is an FSDP `auto_wrap_policy`: each transformer block (the LLM's decoder
layers, the vision tower's encoder layers) becomes one FSDP unit, so a `SparseMoE` inside a layer
is sharded and gathered whole with its router, never split between units; embeddings, norms and
the connector stay in the root unit. Blocks are recognised by their Hugging Face class names
(`...DecoderLayer`, `...EncoderLayer`), so the policy works for any LLM family transformers builds.

`shard_blocks` is the same plan for FSDP2 (`torch.distributed.fsdp.fully_shard`, Lightning's
`ModelParallelStrategy`, configs/strategies/fsdp2.yaml): one `fully_shard` unit per block, then the root.

`ExpertParallelStrategy` (configs/strategies/ep.yaml) is that FSDP2 strategy with expert parallelism: before the
blocks are sharded, `shard_experts` splits the experts of every `SparseMoE` over the data-parallel ranks
(layers/expert_parallel.py), and FSDP2 leaves those expert shards alone. The expert-parallel dimension is the
data-parallel one: each rank trains on its own share of the batch (Lightning's sampler splits batches over the
data-parallel dimension only, so the tensor-parallel one would give the expert ranks the same tokens), and
the expert shards are DTensors on the very mesh FSDP2 shards the rest over, so gradient clipping, the optimizer
and the full-state-dict checkpoint treat them like every other parameter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from .layers import SparseMoE
from .layers.adapters import MoELoRA
from .layers.expert_parallel import shard_along_experts, shard_layer_experts

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

BLOCK_SUFFIXES = ("DecoderLayer", "EncoderLayer")


def is_block(module: nn.Module) -> bool:
    """A transformer block: one FSDP unit."""
    return type(module).__name__.endswith(BLOCK_SUFFIXES)


def decoder_layer_policy(module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
    """FSDP's auto-wrap callable: descend everywhere, wrap every transformer block (module docstring)."""
    return True if recurse else is_block(module)


def shard_blocks(model: nn.Module, mesh: DeviceMesh, ignored_params: set[nn.Parameter] | None = None) -> nn.Module:
    """FSDP2: `fully_shard` every transformer block (`is_block`), then the root (embeddings, norms, connectors,
    everything outside a block), over the 1-D data-parallel `mesh`, except `ignored_params` (expert shards). A
    model already sharded is left as it is (Lightning calls `configure_model` again for each fit / validate / test
    on the same module)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(model, FSDPModule):
        return model
    for module in [m for m in model.modules() if is_block(m)]:  # listed first: sharding changes the classes
        fully_shard(module, mesh=mesh, ignored_params=ignored_params)
    return fully_shard(model, mesh=mesh, ignored_params=ignored_params)


def shard_experts(model: nn.Module, mesh: DeviceMesh) -> set[nn.Parameter]:
    """Expert parallelism: every `SparseMoE` of `model` keeps only this rank's share of its experts over the 1-D
    `mesh` (layers/expert_parallel.py); returns the expert parameters, for `shard_blocks` to leave alone."""
    experts: set[nn.Parameter] = set()
    for layer in [m for m in model.modules() if isinstance(m, SparseMoE)]:
        experts.update(shard_layer_experts(layer, mesh))
    for adapter in [m for m in model.modules() if isinstance(m, MoELoRA)]:  # Uni-MoE: a LoRA update per expert
        for stacked in (adapter.lora_A, adapter.lora_B):
            experts.update(shard_along_experts(stacked, list(stacked.keys()), mesh))
    if not experts:
        raise ValueError("expert parallelism: the model has no SparseMoE layer whose experts could be split")
    return experts


class ExpertParallelStrategy(ModelParallelStrategy):
    """Lightning's `ModelParallelStrategy` (FSDP2) with the experts of every `SparseMoE` split over the
    data-parallel ranks (module docstring; a method's `configure_model` applies `shard_experts`, then
    `shard_blocks`). Needs `tensor_parallel_size: 1` and a number of experts that the data-parallel size divides."""

    def setup_environment(self) -> None:
        super().setup_environment()
        if self.device_mesh["tensor_parallel"].size() != 1:
            raise ValueError("ExpertParallelStrategy splits experts over the data-parallel dimension and supports "
                             f"no tensor parallelism: set tensor_parallel_size: 1 (got {self._tensor_parallel_size})")

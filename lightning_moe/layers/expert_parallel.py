"""Expert parallelism for `SparseMoE`: each rank of a process group holds E / ranks of every layer's experts.

`shard_layer_experts(layer, mesh)` replaces the layer's stacked expert tensors (`w_in`, `down_proj` and their biases)
by DTensors sharded along the expert dimension (`Shard(0)`) over a 1-D device mesh; rank r keeps experts
`r * E/ranks ... (r+1) * E/ranks - 1`. The router and a shared expert are not split (FSDP2, where it runs, shards
them like any other parameter). From then on
`SparseMoE._experts` hands its dispatch to `expert_parallel_forward`:

  1. the (token, slot) pairs are sorted by expert, hence grouped by the rank that holds their expert;
  2. `all_to_all_single` exchanges the per-expert pair counts, then the pairs' token rows;
  3. the received rows are sorted by local expert and run through the experts' FFN (`grouped.run_sorted_experts`);
  4. a second `all_to_all_single` brings every pair's expert output back to its token's rank, where the gate
     weights combine them exactly as the single-process dispatch does.

Both exchanges are differentiable (`torch.distributed.nn.functional.all_to_all_single`): the backward sends the
output gradients to the experts' ranks and the input gradients back. An expert's weight gradient on its rank is
therefore the sum of every rank's loss's gradient; data-parallel training averages gradients over ranks, so the local
weights pass through `_AverageGradient` (identity forward, gradient / ranks backward) to give the same average
as FSDP2 / DDP give every other parameter.

Because the shards are DTensors on the data-parallel mesh itself, the machinery that already handles FSDP2's
DTensors handles them too: gradient-norm clipping sees every expert once, and `get_model_state_dict` /
`set_model_state_dict` with full state dicts gather and re-shard them (one ordinary checkpoint with all experts).

Routing statistics stay global: the router's outputs carry the expert group (`RouterOutput.group`), so the
load-balancing and z-losses (`routing.py`) sum their per-expert counts and probabilities over every rank's
tokens, as one process on the whole batch computes them. Capacity dropping, when configured, applies to each
rank's own tokens (DeepSpeed's rule).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .grouped import combine_pairs, inverse_permutation, make_offsets, run_sorted_experts, sort_pairs

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

__all__ = ["shard_layer_experts", "shard_along_experts", "expert_parallel_forward", "EXPERT_TENSORS"]

# the stacked per-expert tensors of a SparseMoE (those present on a given layer), sharded along dim 0
EXPERT_TENSORS = ("gate_up_proj", "up_proj", "down_proj", "gate_up_bias", "up_bias", "down_bias")


def shard_layer_experts(layer: nn.Module, mesh: DeviceMesh) -> list[nn.Parameter]:
    """Keep only this rank's experts of the `SparseMoE` `layer` (module docstring); returns its expert parameters,
    now DTensors. A layer already sharded is left as it is."""
    names = [name for name in EXPERT_TENSORS if getattr(layer, name, None) is not None]
    sharded = shard_along_experts(layer, names, mesh)
    layer.expert_group = mesh.get_group()
    layer.router.group = layer.expert_group
    return sharded


def shard_along_experts(module: nn.Module, names: list[str], mesh: DeviceMesh) -> list[nn.Parameter]:
    """Replace `module`'s parameters `names`, stacked along the experts (dim 0), by DTensors sharded along that
    dimension over the 1-D `mesh` (`Shard(0)`); a parameter already a DTensor is kept. Also for per-expert tensors
    beside a `SparseMoE`'s own (LoRA on its experts). Returns the parameters."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    if mesh.ndim != 1:
        raise ValueError(f"expert parallelism needs a 1-D device mesh, got {mesh.ndim} dimensions "
                         f"{mesh.mesh_dim_names}")
    sharded = []
    for name in names:
        param = getattr(module, name)
        if not isinstance(param, DTensor):
            if param.shape[0] % mesh.size():
                raise ValueError(f"{type(module).__name__}.{name}: {param.shape[0]} experts cannot be split evenly "
                                 f"over {mesh.size()} expert-parallel ranks")
            param = nn.Parameter(distribute_tensor(param.detach(), mesh, [Shard(0)]), requires_grad=param.requires_grad)
            setattr(module, name, param)
        sharded.append(param)
    return sharded


class _AverageGradient(torch.autograd.Function):
    """Identity forward; backward divides the gradient by the number of data-parallel ranks (module docstring)."""

    @staticmethod
    def forward(ctx, x: Tensor, ranks: int) -> Tensor:
        ctx.ranks = ranks
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad / ctx.ranks, None


def _local(param: Tensor | None, ranks: int, dtype: torch.dtype) -> Tensor | None:
    """This rank's shard of an expert tensor, in the compute dtype, its gradient averaged over ranks."""
    if param is None:
        return None
    local = param.to_local(grad_placements=param.placements) if hasattr(param, "to_local") else param
    return _AverageGradient.apply(local, ranks).to(dtype)


def _exchange(rows: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
    from torch.distributed.nn.functional import all_to_all_single

    out = rows.new_empty(sum(out_splits), rows.shape[1])
    return all_to_all_single(out, rows.contiguous(), out_splits, in_splits, group=group)


def expert_parallel_forward(layer: nn.Module, flat: Tensor, indices: Tensor, weights: Tensor,
                            dropped: Tensor | None) -> Tensor:
    """`SparseMoE._experts` over an expert-parallel group: flat (T, H) this rank's tokens, indices / weights (T, k)
    their chosen experts and gate weights, dropped (T, k) or None. Returns the routed experts' sum (T, H)."""
    group = layer.expert_group
    ranks, num_experts = dist.get_world_size(group), layer.num_experts
    local_experts = num_experts // ranks
    k, dtype = indices.shape[1], flat.dtype

    # dropped pairs go to a sentinel expert E that sorts last and is never sent
    sorted_expert, order = sort_pairs(indices, dropped, num_experts)  # pair p = token p // k, slot p % k
    counts = torch.bincount(sorted_expert, minlength=num_experts + 1)[:num_experts]  # (E,) pairs per expert
    kept = int(counts.sum())
    order = order[:kept]
    token = order // k

    # counts first: received[s, e] = pairs rank s sends to this rank's local expert e
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts, group=group)
    received = received.view(ranks, local_experts)
    send_splits = counts.view(ranks, local_experts).sum(1).tolist()
    recv_splits = received.sum(1).tolist()

    rows = _exchange(flat.index_select(0, token), recv_splits, send_splits, group)  # (R, H), by source rank
    # sorted by local expert for the grouped matmuls (stable: source rank order inside each expert)
    row_expert = torch.arange(local_experts, device=flat.device).repeat(ranks).repeat_interleave(received.reshape(-1))
    by_expert = torch.sort(row_expert, stable=True).indices
    offsets = make_offsets(received.sum(0).tolist(), flat.device)
    w_in, w_down, b_in, b_down = (_local(p, ranks, dtype)
                                  for p in (layer.w_in, layer.down_proj, layer.b_in, layer.down_bias))
    y = run_sorted_experts(rows.index_select(0, by_expert), offsets, w_in, w_down, b_in, b_down,
                           layer.act_fn, layer.gated)
    y = _exchange(y.index_select(0, inverse_permutation(by_expert)), send_splits, recv_splits, group)  # (S, H)

    # pairs sorted by expert; every token has its k pairs unless some dropped, as the single-process dispatch sums
    pair_w = weights.reshape(-1)[order].to(dtype)
    inverse = inverse_permutation(order) if dropped is None else None
    return combine_pairs(y, pair_w, token, inverse, flat.shape)

"""The offloaded layer: `OffloadedSparseMoE`, and `offload`, which puts it in place of a model's SparseMoE layers.

`offload(model, store, ...)` swaps every `SparseMoE` of a resident model for an
`OffloadedSparseMoE` that keeps the router (and everything about routing and dispatch) of
`SparseMoE` and overrides only `expert_weights`: it asks the `ExpertOffloader` (offloader.py) for
the experts that received tokens and returns a stack of just those, so the layer's dispatch runs
unchanged on a smaller expert dimension. To build the model from the store alone, without ever
allocating its experts: `loading.load_offloaded`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ..layers import SparseMoE
from ..models import MultimodalLM
from .offloader import ExpertOffloader
from .store import ExpertStore, expert_layers

__all__ = ["OffloadedSparseMoE", "offload", "swap_layers"]


class OffloadedSparseMoE(SparseMoE):
    """A SparseMoE whose experts live in an ExpertStore (served by an ExpertOffloader).

    Shares the router module and every routing/dispatch setting of the layer it replaces; holds
    no expert parameters.
    """

    def __init__(self, moe: SparseMoE, layer_index: int, offloader: ExpertOffloader) -> None:
        nn.Module.__init__(self)  # not SparseMoE.__init__: that would allocate all experts
        for name in ("hidden_size", "intermediate_size", "num_experts", "top_k", "gated", "capacity_factor",
                     "eval_capacity_factor", "min_capacity"):
            setattr(self, name, getattr(moe, name))
        self.router, self.act_fn = moe.router, moe.act_fn
        # a shared expert (Qwen2-MoE) sees every token: resident, like the router (not in the store)
        self.shared_expert, self.shared_expert_gate = moe.shared_expert, moe.shared_expert_gate
        self.layer_index, self.offloader = layer_index, offloader
        offloader.routers[layer_index] = self.router
        self._call: tuple[Tensor, list[int]] | None = None  # this call's input and experts, for prediction
        self.last_routing = None
        self.train(moe.training)

    def _experts(self, flat: Tensor, indices: Tensor, weights: Tensor, dropped: Tensor | None) -> Tensor:
        # A prefill may route to every expert of the layer; with max_working_experts set, the
        # experts are brought in groups of that many (the pairs of other groups marked dropped,
        # so SparseMoE's dispatch skips them) and the group outputs summed, which bounds the dense
        # weights held at once. The summation order then differs from one pass (float rounding).
        if torch.is_grad_enabled() and flat.requires_grad:
            # the stacks are reused buffers and the experts are not parameters: nothing to train here
            raise RuntimeError("offloaded experts are for inference: run under torch.no_grad() (or freeze the model)")
        limit = self.offloader.max_working_experts
        used = torch.unique(indices if dropped is None else indices[~dropped]).tolist()
        self._call = (flat, used)  # predictions use the whole call's choice, also when experts come in groups
        if limit is None or len(used) <= limit:
            return super()._experts(flat, indices, weights, dropped)
        out = None
        for start in range(0, len(used), limit):
            outside = ~torch.isin(indices, torch.tensor(used[start : start + limit], device=indices.device))
            if dropped is not None:
                outside |= dropped
            part = super()._experts(flat, indices, weights, outside)  # (T, H)
            out = part if out is None else out + part
        return out

    def expert_weights(self, counts: list[int], sorted_expert: Tensor):
        used = [e for e, c in enumerate(counts) if c]
        hidden, chosen = self._call
        first_group = used[0] == chosen[0]  # predict the next layer once per call, after its first group
        w_in, w_down, b_in, b_down = self.offloader.expert_stack(self.layer_index, used, hidden, chosen, first_group)
        # renumber the sorted pairs' experts to positions in the stack (only biases index by expert)
        position = torch.full((self.num_experts + 1,), -1, dtype=torch.long, device=sorted_expert.device)
        position[used] = torch.arange(len(used), device=sorted_expert.device)
        return w_in, w_down, b_in, b_down, [counts[e] for e in used], position[sorted_expert]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, offloaded MoE layer {self.layer_index}"


def swap_layers(model: nn.Module, offloader: ExpertOffloader) -> None:
    """Replace every SparseMoE of `model` (in place) by an OffloadedSparseMoE served by `offloader`."""
    for index, (name, moe) in enumerate(expert_layers(model)):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, OffloadedSparseMoE(moe, index, offloader))


def offload(model: MultimodalLM, store: ExpertStore | str | Path, **offloader_kwargs) -> ExpertOffloader:
    """Swap the model's SparseMoE layers (in place) for offloaded ones served from `store`.

    Raises StoreError if the store was exported from another model. Keyword arguments go to
    `ExpertOffloader` (budget_bytes, policy, profile, prefetch, prediction, prefetch_width, ...).
    """
    store = store if isinstance(store, ExpertStore) else ExpertStore(Path(store))
    if any(isinstance(m, OffloadedSparseMoE) for m in model.modules()):
        raise ValueError("the model is already offloaded")
    devices = {p.device.type for p in model.parameters()}
    if devices != {"cpu"}:
        # experts are read from storage into CPU tensors; EdgeMoE targets CPU-resident inference
        raise ValueError(f"offloading serves experts on the CPU; the model is on {sorted(devices)} (move it to cpu)")
    store.check_model(model)
    offloader = ExpertOffloader(store, **offloader_kwargs)
    swap_layers(model, offloader)
    return offloader

"""Building a model from an expert store: the recorded architecture, the resident weights, experts resident or offloaded.

`model_from_store` builds the `MultimodalLM` the manifest records with its parameters on the meta
device (shapes, no memory), so no weight is initialised randomly just to be overwritten; only
then are parameters given memory and the verified resident weights (base.safetensors) loaded.
Two uses:
- `load_resident_model(store)`: the whole model in memory, experts read from the store and
  dequantised to float32 (for profiling and planning);
- `load_offloaded(store, ...)`: every SparseMoE swapped for an `OffloadedSparseMoE` before memory
  is given, so the expert weights are never allocated and loading peaks at the resident weights.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ..models import MultimodalLM
from ..models.meta import materialize, parameters_on_meta
from .offload import swap_layers
from .offloader import ExpertOffloader
from .store import BASE_WEIGHTS, ExpertStore, StoreError, expert_keys, expert_layers

__all__ = ["model_from_store", "load_resident_model", "load_offloaded"]


def model_from_store(store: ExpertStore, replace_experts: Callable[[MultimodalLM], None] | None = None) -> MultimodalLM:
    """The recorded model with the store's resident weights (base.safetensors) loaded.

    The model is built with its parameters on the meta device and only then given memory, so no
    weight is initialised randomly just to be overwritten. replace_experts: None = every SparseMoE
    keeps its experts, read from the store (dequantised to float32): the whole model in memory, for
    profiling and planning. Otherwise `replace_experts(model)` swaps the SparseMoE layers for
    layers that hold no expert (offloading) before memory is given: the expert weights are never
    allocated, so loading peaks at the resident weights, not the whole model.
    """
    with parameters_on_meta():  # no random initialisation of weights that are loaded next
        model = MultimodalLM.from_config_dict(store.manifest["model_config"])
    layers = expert_layers(model)
    if len(layers) != len(store.layers):
        raise StoreError(f"{store.directory}: the recorded model has {len(layers)} MoE layers, the manifest "
                         f"{len(store.layers)}")
    if replace_experts is not None:
        replace_experts(model)
    try:
        materialize(model)
    except ValueError as error:
        raise StoreError(f"{store.directory}: {error}") from error
    missing, unexpected = model.load_state_dict(store.load_base(), strict=False)
    missing = set(missing) - (expert_keys(model) if replace_experts is None else set())
    if missing or unexpected:
        raise StoreError(f"{store.directory / BASE_WEIGHTS} does not match the recorded model: "
                         f"missing {sorted(missing)[:5]}, unexpected {unexpected[:5]}")
    if replace_experts is None:
        with torch.no_grad():
            for index, (_, moe) in enumerate(layers):
                for e in range(moe.num_experts):
                    tensors = store.read_float(index, e)
                    moe.w_in[e].copy_(tensors["w_in"])
                    moe.down_proj[e].copy_(tensors["w_down"])
                    if moe.b_in is not None:
                        moe.b_in[e].copy_(tensors["b_in"])
                        moe.down_bias[e].copy_(tensors["b_down"])
    return model.eval()


def load_resident_model(store: ExpertStore) -> MultimodalLM:
    """The whole model in memory from a store (experts dequantised to float32): for profiling and planning."""
    return model_from_store(store)


def load_offloaded(store: ExpertStore | str | Path, **offloader_kwargs) -> tuple[MultimodalLM, ExpertOffloader]:
    """Build the model from a store alone: resident weights from base.safetensors, experts offloaded.

    The expert weights are never allocated (the model is built on the meta device and only the
    resident part gets memory), so this peaks at the resident weights, not the whole model.
    Keyword arguments go to `ExpertOffloader` (budget_bytes, policy, profile, prefetch, ...).
    """
    store = store if isinstance(store, ExpertStore) else ExpertStore(Path(store))
    offloader = ExpertOffloader(store, **offloader_kwargs)
    model = model_from_store(store, replace_experts=lambda m: swap_layers(m, offloader))
    model.requires_grad_(False)
    return model, offloader

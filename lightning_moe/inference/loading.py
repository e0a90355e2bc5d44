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

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..models import MultimodalLM
from .offload import swap_layers
from .offloader import ExpertOffloader
from .store import BASE_WEIGHTS, ExpertStore, StoreError, expert_keys, expert_layers

__all__ = ["model_from_store", "load_resident_model", "load_offloaded"]


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (shapes, no memory); buffers
    (e.g. rotary frequencies, computed at construction and not saved) stay real. Parameters are
    allocated with `torch.empty` before the move, which touches no page, so nothing is resident."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _materialize(model: nn.Module) -> None:
    """Give every meta parameter and buffer (uninitialised) CPU memory; a tensor shared by modules stays shared.

    A buffer is on the meta device when it was built as a parameter and then turned into a buffer (an image
    tower's unused pooling keeps its weights as buffers, modalities/image.py); like the parameters, it is
    filled by the resident weights next. Left on the meta device, `load_state_dict` would skip it with
    torch's "copying from a non-meta parameter ... is a no-op" warning."""
    memo: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                if id(param) not in memo:
                    memo[id(param)] = nn.Parameter(torch.empty_like(param, device="cpu"),
                                                   requires_grad=param.requires_grad)
                module._parameters[name] = memo[id(param)]
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.is_meta:
                if name in module._non_persistent_buffers_set:  # no saved value could ever fill it
                    raise StoreError(f"buffer {name!r} of {type(module).__name__} was built on the meta device and "
                                     "is not saved: the model cannot be loaded from a store")
                module._buffers[name] = memo.setdefault(id(buffer), torch.empty_like(buffer, device="cpu"))


def model_from_store(store: ExpertStore, replace_experts: Callable[[MultimodalLM], None] | None = None) -> MultimodalLM:
    """The recorded model with the store's resident weights (base.safetensors) loaded.

    The model is built with its parameters on the meta device and only then given memory, so no
    weight is initialised randomly just to be overwritten. replace_experts: None = every SparseMoE
    keeps its experts, read from the store (dequantised to float32): the whole model in memory, for
    profiling and planning. Otherwise `replace_experts(model)` swaps the SparseMoE layers for
    layers that hold no expert (offloading) before memory is given: the expert weights are never
    allocated, so loading peaks at the resident weights, not the whole model.
    """
    with _parameters_on_meta():  # no random initialisation of weights that are loaded next
        model = MultimodalLM.from_config_dict(store.manifest["model_config"])
    layers = expert_layers(model)
    if len(layers) != len(store.layers):
        raise StoreError(f"{store.directory}: the recorded model has {len(layers)} MoE layers, the manifest "
                         f"{len(store.layers)}")
    if replace_experts is not None:
        replace_experts(model)
    _materialize(model)
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

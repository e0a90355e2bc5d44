"""Freeze plans: named parameter groups, and `set_trainable` (freeze all, unfreeze some groups).

A stage of a method says which groups train (`methods/`); the `adapters` group asks each adapter's
kind which of its tensors train (MoRA: only the newest task's ranks, earlier tasks stay frozen).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from torch import nn

from .adapters import adapter_parameters
from .architecture import decoder_layers, expert_layers, mlp_attribute
from .multimodal import MultimodalLM

__all__ = ["PARAMETER_GROUPS", "set_trainable"]


def _sparse_parameters(model: MultimodalLM) -> Iterator[nn.Parameter]:
    for _, layer in expert_layers(model.llm):
        yield from layer.parameters()


def _router_parameters(model: MultimodalLM) -> Iterator[nn.Parameter]:
    for _, layer in expert_layers(model.llm):
        yield from layer.router.parameters()


def _mlp_parameters(model: MultimodalLM) -> Iterator[nn.Parameter]:
    for layer in decoder_layers(model.llm):
        yield from getattr(layer, mlp_attribute(layer)).parameters()


# group name -> the parameters it names. "vision" is every modality encoder (image and audio towers). A stage's freeze plan is a list of group names.
PARAMETER_GROUPS: dict[str, Callable[[MultimodalLM], Iterator[nn.Parameter]]] = {
    "vision": lambda m: m.encoders.parameters(),
    "connector": lambda m: m.connectors.parameters(),
    "llm": lambda m: m.llm.parameters(),
    "moe": _sparse_parameters,
    "router": _router_parameters,  # only the sparse layers' routers (Uni-MoE stage 3: experts take LoRA)
    "mlp": _mlp_parameters,  # every decoder layer's feed-forward block (Uni-MoE stage 2)
    "adapters": lambda m: (p for _, p in adapter_parameters(m, trainable_only=True)),
}


def set_trainable(model: MultimodalLM, groups: list[str]) -> set[str]:
    """Freeze everything, then unfreeze the named groups. Returns the trainable parameter names."""
    unknown = set(groups) - set(PARAMETER_GROUPS)
    if unknown:
        raise ValueError(f"unknown parameter groups {sorted(unknown)}; known: {sorted(PARAMETER_GROUPS)}")
    model.requires_grad_(False)
    for group in groups:
        for p in PARAMETER_GROUPS[group](model):
            p.requires_grad_(True)
    return {n for n, p in model.named_parameters() if p.requires_grad}

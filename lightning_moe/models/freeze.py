"""Freeze plans: named parameter groups, and `set_trainable` (freeze all, unfreeze some groups).

A stage of a method says which groups train (`methods/`); the `adapters` group asks each adapter's
kind which of its tensors train (MoRA: only the newest task's ranks, earlier tasks stay frozen).
`PARAMETER_GROUPS` are the groups every model has; a method adds its own (`parameter_groups`), which
`set_trainable` takes beside them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from torch import nn

from .adapters import adapter_parameters
from .architecture import decoder_layers, expert_layers, mlp_attribute
from .multimodal import MultimodalLM

__all__ = ["PARAMETER_GROUPS", "ParameterGroup", "mlp_parameters", "set_trainable"]

ParameterGroup = Callable[[MultimodalLM], Iterator[nn.Parameter]]  # model -> the parameters the group names


def _sparse_parameters(model: MultimodalLM) -> Iterator[nn.Parameter]:
    for _, layer in expert_layers(model.llm):
        yield from layer.parameters()


def mlp_parameters(model: MultimodalLM) -> Iterator[nn.Parameter]:
    """Every decoder layer's feed-forward block (dense or sparse): the `mlp` group of the methods that offer it."""
    for layer in decoder_layers(model.llm):
        yield from getattr(layer, mlp_attribute(layer)).parameters()


# group name -> the parameters it names. "vision" is every modality encoder (image and audio towers). A stage's freeze plan is a list of group names.
PARAMETER_GROUPS: dict[str, ParameterGroup] = {
    "vision": lambda m: m.encoders.parameters(),
    "connector": lambda m: m.connectors.parameters(),
    "llm": lambda m: m.llm.parameters(),
    "moe": _sparse_parameters,
    "adapters": lambda m: (p for _, p in adapter_parameters(m, trainable_only=True)),
}


def set_trainable(model: MultimodalLM, groups: list[str],
                  extra: Mapping[str, ParameterGroup] | None = None) -> set[str]:
    """Freeze everything, then unfreeze the named groups (`PARAMETER_GROUPS`, and a method's `extra` ones).
    Returns the trainable parameter names."""
    known = {**PARAMETER_GROUPS, **(extra or {})}
    unknown = set(groups) - set(known)
    if unknown:
        raise ValueError(f"unknown parameter groups {sorted(unknown)}; known: {sorted(known)}")
    model.requires_grad_(False)
    for group in groups:
        for p in known[group](model):
            p.requires_grad_(True)
    return {n for n, p in model.named_parameters() if p.requires_grad}

"""The adapter-kind registry: a kind's name -> `AdapterKind` (its config, layer, target, tensors).

`models/adapters.py` plans, adds, saves, loads, merges and freezes adapters only through this
registry, so a new kind is one file that calls `register_adapter_kind` (see `lora.py` for the
smallest one); nothing else in the package changes. Pure Python + torch, as all of layers/.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

__all__ = ["AdapterKind", "register_adapter_kind", "adapter_kind", "adapter_kinds", "kind_of",
           "adapter_tensors", "trainable_adapter_tensors"]


@dataclass(frozen=True)
class AdapterKind:
    """What surgery needs to know about one adapter kind."""

    name: str  # what a rule's `kind:` says
    config: type  # dataclass of the kind's own options; its fields are `layer`'s keyword arguments
    layer: type[nn.Module]  # built as `layer(wrapped_module, **asdict(config))`
    target: Literal["linear", "mlp"]  # wraps an nn.Linear, or a decoder layer's whole MLP
    wrapped: str  # attribute of the layer holding the wrapped module: its tensors are the base's, not the adapter's
    # the adapter tensors that train, by name relative to the layer; None = all of them. MoRA: the newest task's
    trainable: Callable[[nn.Module], Iterator[tuple[str, nn.Parameter]]] | None = None
    # the layer has `merge(exact: bool)` folding its update into the wrapped module (which then replaces it)
    mergeable: bool = False
    # continual learning: `add_task(layer, r)` grows the layer by a new task's r ranks, which from then on are
    # the ones that train (`trainable`); None = the kind has no tasks. MoRA: earlier tasks' ranks freeze
    add_task: Callable[[nn.Module, int], None] | None = None

    def __post_init__(self) -> None:
        if not dataclasses.is_dataclass(self.config):
            raise TypeError(f"adapter kind {self.name!r}: config must be a dataclass, got {self.config!r}")
        if self.target not in ("linear", "mlp"):
            raise ValueError(f"adapter kind {self.name!r}: target must be 'linear' or 'mlp', got {self.target!r}")

    def build(self, module: nn.Module, config: Any) -> nn.Module:
        return self.layer(module, **dataclasses.asdict(config))


_KINDS: dict[str, AdapterKind] = {}


def register_adapter_kind(kind: AdapterKind, *, replace: bool = False) -> AdapterKind:
    """Make `kind` available to adapter rules by its name. Registering a taken name is an error
    unless `replace` (a second kind under one name would make saved logs ambiguous)."""
    if kind.name in _KINDS and not replace and _KINDS[kind.name] != kind:
        raise ValueError(f"adapter kind {kind.name!r} is already registered ({_KINDS[kind.name].layer.__name__}); "
                         "pass replace=True to override it")
    _KINDS[kind.name] = kind
    return kind


def adapter_kind(name: str) -> AdapterKind:
    if name not in _KINDS:
        raise ValueError(f"adapter kind {name!r} unknown; registered: {sorted(_KINDS)} "
                         "(a kind defined outside the package must be registered before it is used)")
    return _KINDS[name]


def adapter_kinds() -> dict[str, AdapterKind]:
    return dict(_KINDS)


def kind_of(module: nn.Module) -> AdapterKind | None:
    """The registered kind whose layer `module` is, or None for any other module."""
    return next((k for k in _KINDS.values() if isinstance(module, k.layer)), None)


def adapter_tensors(layer: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Every adapter tensor of an adapter layer, by name relative to it (the wrapped base excluded)."""
    kind = kind_of(layer)
    if kind is None:
        raise TypeError(f"{type(layer).__name__} is not a registered adapter layer")
    prefix = kind.wrapped + "."
    return ((n, p) for n, p in layer.named_parameters() if not n.startswith(prefix))


def trainable_adapter_tensors(layer: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    kind = kind_of(layer)
    return adapter_tensors(layer) if kind is None or kind.trainable is None else kind.trainable(layer)

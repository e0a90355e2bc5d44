"""LoRA: `LoRALinear`, a low-rank update around a frozen `nn.Linear`, and its adapter kind "lora".

Uses peft's parameter layout (`lora_A.weight` (r, in), `lora_B.weight` (out, r), `scaling = alpha / r`,
A kaiming-uniform(a=sqrt 5), B zeros) so weights move between the two. The wrapped linear stays
reachable as `base_layer` (not copied), so surgery swaps it in place and a state dict keeps the base keys.

This file is also the template of an adapter kind: a config dataclass (the layer's keyword
arguments), the layer, and one `register_adapter_kind` call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .registry import AdapterKind, register_adapter_kind

__all__ = ["LoRAConfig", "LoRALinear"]


@dataclass
class LoRAConfig:
    r: int = 8  # rank
    alpha: float = 16.0  # scaling = alpha / r
    dropout: float = 0.0  # dropout on the adapter input


def _dropout(p: float) -> nn.Module:
    return nn.Dropout(p) if p > 0 else nn.Identity()


class LoRALinear(nn.Module):
    """`base(x) + scaling * lora_B(lora_A(dropout(x)))` around a frozen `nn.Linear`."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if r <= 0:
            raise ValueError(f"rank r must be positive, got {r}")
        self.base_layer = base.requires_grad_(False)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        kw = dict(device=base.weight.device)
        self.lora_A = nn.Linear(base.in_features, r, bias=False, **kw)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, **kw)
        self.lora_dropout = _dropout(dropout)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self._original_weight: Tensor | None = None  # pre-merge weight, for an exact unmerge
        self._merged = False

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> Tensor:  # code that reads `.weight` of a linear keeps working
        return self.base_layer.weight

    @property
    def merged(self) -> bool:
        return self._merged

    def delta_weight(self) -> Tensor:
        """scaling * B @ A, (out, in), in the base weight's dtype."""
        delta = self.lora_B.weight @ self.lora_A.weight * self.scaling
        return delta.to(self.base_layer.weight.dtype)

    @torch.no_grad()
    def merge(self, exact: bool = True) -> None:
        """Fold the update into the base weight (no-op when merged already).

        exact=True keeps a copy of the pre-merge weight so `unmerge` restores it bit for bit;
        exact=False subtracts the update again on unmerge, as peft does (no extra memory,
        rounding error of one add).
        """
        if self._merged:
            return
        w = self.base_layer.weight
        self._original_weight = w.detach().clone() if exact else None
        w.add_(self.delta_weight())
        self._merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self._merged:
            return
        w = self.base_layer.weight
        if self._original_weight is not None:
            w.copy_(self._original_weight)
            self._original_weight = None
        else:
            w.sub_(self.delta_weight())
        self._merged = False

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)
        if self._merged:
            return out
        x = x.to(self.lora_A.weight.dtype)
        return out + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, merged={self._merged}"


register_adapter_kind(AdapterKind(name="lora", config=LoRAConfig, layer=LoRALinear, target="linear",
                                  wrapped="base_layer", mergeable=True))

"""LoRA on the experts of a `SparseMoE` (Uni-MoE stage 3): `MoELoRA`, and its adapter kind "moe_lora".

Each expert's projections (gate, up, down of a gated FFN; up, down of a plain one) get their own
rank-r update, as peft's LoRA would give each expert's `gate_proj`/`up_proj`/`down_proj`:
    W_e,role  <-  W_e,role + (alpha / r) · B_e,role @ A_e,role
`lora_A[role]` (E, r, in) is kaiming-uniform, `lora_B[role]` (E, out, r) zeros, so the adapted layer
starts as the wrapped one. The router is the wrapped layer's and is not adapted (Uni-MoE trains its
new router fully: it belongs to the `router` parameter group, not to the adapter).

The update is applied to the stacked expert weights and the wrapped layer's own dispatch runs on the
sum (`torch.func.functional_call`), so routing, capacity and the routing statistics are exactly the
`SparseMoE`'s; the cost is one (E, out, r) @ (E, r, in) product per projection and step, small against
the experts' matmuls at training batch sizes. Mergeable: `merge` folds the update into the experts,
giving back a plain `SparseMoE` (what expert offloading and export read). No input dropout: the update
lives in the weights, not on the token path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..moe import SparseMoE
from .registry import AdapterKind, register_adapter_kind

__all__ = ["MoELoRAConfig", "MoELoRA"]


@dataclass
class MoELoRAConfig:
    r: int = 8  # rank of each expert projection's update (Uni-MoE: 8)
    alpha: float = 16.0  # scaling = alpha / r (Uni-MoE: 16)


class MoELoRA(nn.Module):
    """A `SparseMoE` (`moe`, frozen) whose experts each carry a LoRA update per projection."""

    def __init__(self, moe: SparseMoE, r: int = 8, alpha: float = 16.0) -> None:
        super().__init__()
        if not isinstance(moe, SparseMoE):
            raise TypeError(f"moe_lora adapts a SparseMoE (an MoE layer after surgery), got {type(moe).__name__}")
        if r <= 0:
            raise ValueError(f"rank r must be positive, got {r}")
        self.moe = moe
        for p in moe.parameters():  # the experts freeze; the router is handed to its own group by the method
            p.requires_grad_(False)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        E, H, I = moe.num_experts, moe.hidden_size, moe.intermediate_size
        shapes = {"gate": (I, H), "up": (I, H), "down": (H, I)} if moe.gated else {"up": (I, H), "down": (H, I)}
        dev = moe.down_proj.device
        self.lora_A = nn.ParameterDict({k: nn.Parameter(torch.empty(E, r, i, device=dev)) for k, (_, i) in shapes.items()})
        self.lora_B = nn.ParameterDict({k: nn.Parameter(torch.zeros(E, o, r, device=dev)) for k, (o, _) in shapes.items()})
        for a in self.lora_A.values():
            for e in range(E):  # per expert, fan_in = in_features, as peft
                nn.init.kaiming_uniform_(a.data[e], a=math.sqrt(5))
        self._merged = False

    @property
    def merged(self) -> bool:
        return self._merged

    def delta(self, role: str) -> Tensor:
        """scaling · B @ A for every expert, (E, out, in)."""
        return torch.bmm(self.lora_B[role], self.lora_A[role]) * self.scaling

    def deltas(self) -> dict[str, Tensor]:
        """The update of each stacked expert tensor of the wrapped layer, by its parameter name."""
        moe = self.moe
        w_in = torch.cat([self.delta("gate"), self.delta("up")], dim=1) if moe.gated else self.delta("up")
        return {"gate_up_proj" if moe.gated else "up_proj": w_in.to(moe.w_in.dtype),
                "down_proj": self.delta("down").to(moe.down_proj.dtype)}

    def forward(self, x: Tensor) -> Tensor:
        if self._merged:
            return self.moe(x)
        params = dict(self.moe.named_parameters())
        adapted = {name: params[name] + delta for name, delta in self.deltas().items()}
        return functional_call(self.moe, adapted, (x,))

    @torch.no_grad()
    def merge(self, exact: bool = True) -> None:
        """Fold the updates into the experts (no-op when merged). `exact` is accepted for the kind's merge
        interface; an unmerge subtracts the update again (one rounding error of an add)."""
        if self._merged:
            return
        params = dict(self.moe.named_parameters())
        for name, delta in self.deltas().items():
            params[name].add_(delta)
        self._merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self._merged:
            return
        params = dict(self.moe.named_parameters())
        for name, delta in self.deltas().items():
            params[name].sub_(delta)
        self._merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, merged={self._merged}"


register_adapter_kind(AdapterKind(name="moe_lora", config=MoELoRAConfig, layer=MoELoRA, target="mlp", wrapped="moe",
                                  mergeable=True))

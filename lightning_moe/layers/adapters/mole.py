"""LLaVA-MoLE's MLP adapter: `MoLEMLP`, E top-1 LoRA experts on each projection of an MLP, its
adapter kind "mole" (targets a decoder layer's whole MLP; routed, so it cannot be merged), and the
reference's balance loss, registered as the form "mole" of `load_balancing_loss`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..grouped import (
    dispatch_path,
    grouped_linear,
    grouped_linear_offsets,
    make_offsets,
    sort_pairs,
    sorted_offsets,
)
from ..mlp import mlp_layout
from ..routing import BalanceForm, RoutedLayer, RouterOutput, TopKRouter, register_balance_form
from .lora import _dropout
from .registry import AdapterKind, register_adapter_kind

__all__ = ["MoLEConfig", "MoLEMLP"]


@dataclass
class MoLEConfig:
    num_experts: int = 3  # LoRA experts per MLP projection (reference E=3)
    r: int = 8  # rank of each expert
    alpha: float = 16.0  # scaling = alpha / r
    dropout: float = 0.0  # on the adapter input (the reference uses 0.05)
    scale_by_prob: bool = True  # scale the expert update by its router probability; False = reference
    router_bias: bool = True  # Linear(d, E) router with bias, as the reference


class MoLEMLP(nn.Module, RoutedLayer):
    """LLaVA-MoLE: E top-1 LoRA experts on each projection of an MLP, one shared router.

    The router `Linear(H, E, bias)` sees the MLP input; its top-1 choice selects the same expert
    index for the gate, up and down projections. The frozen base projections run once for all
    tokens; each token runs only its chosen expert's LoRA. To keep that cheap, tokens are sorted
    by expert once at the MLP input, the whole MLP runs in that order (base projections do not
    care about row order), and the output is unsorted once.

    scale_by_prob=True: the expert's update is scaled by its router probability (Switch-style,
    the router learns from the task loss). False: the reference behaviour, update unscaled; the
    router then learns only from the balance loss (`load_balancing_loss(..., form="mole")`).
    Expert LoRA weights: `lora_A[role]` (E, r, in), `lora_B[role]` (E, out, r).
    The LoRA experts take the tensor-offsets grouped matmuls (`grouped.dispatch_path`: traceable by
    `torch.compile`, no host synchronisation; eager too) where the LoRA dtype allows (bfloat16 with in, out and r
    multiples of 8 in torch 2.13); else in eager per-expert counts as Python ints, and under compile
    every LoRA expert on every token with the others' outputs zeroed (E x the LoRA FLOPs, small at rank r).
    """

    def __init__(
        self,
        mlp: nn.Module,
        num_experts: int,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        *,
        scale_by_prob: bool = True,
        router_bias: bool = True,
    ) -> None:
        super().__init__()
        layout = mlp_layout(mlp)
        projections, self.act_fn, self.gated = layout.projections, layout.activation, layout.gated
        self._names = layout.names
        self.mlp = mlp.requires_grad_(False)
        self.num_experts, self.r, self.alpha, self.scaling = num_experts, r, alpha, alpha / r
        self.scale_by_prob = scale_by_prob
        hidden = projections["up"].in_features
        self.router = TopKRouter(hidden, num_experts, 1, normalize=False, bias=router_bias)
        # every LoRA matmul's row width, for the dispatch choice (`grouped.dispatch_path`)
        self._lora_widths = (*(n for p in projections.values() for n in (p.in_features, p.out_features)), r)
        dev = projections["up"].weight.device
        self.lora_A = nn.ParameterDict(
            {k: nn.Parameter(torch.empty(num_experts, r, p.in_features, device=dev)) for k, p in projections.items()}
        )
        self.lora_B = nn.ParameterDict(
            {k: nn.Parameter(torch.zeros(num_experts, p.out_features, r, device=dev)) for k, p in projections.items()}
        )
        for a in self.lora_A.values():
            for e in range(num_experts):  # per expert, fan_in = in_features, as peft
                nn.init.kaiming_uniform_(a.data[e], a=math.sqrt(5))
        self.lora_dropout = _dropout(dropout)
        self.last_routing = None
        # an oracle's routing: (B,) expert index per sample, every token of sample b goes to expert
        # forced_expert[b] with weight 1 (the router still runs, for its statistics); None = the router
        self.forced_expert: Tensor | None = None

    def _proj(self, role: str) -> nn.Linear:
        return getattr(self.mlp, self._names[role])

    def _lora(self, role: str, x: Tensor, counts: list[int] | None, offs: Tensor | None, scale: Tensor) -> Tensor:
        """The role's LoRA experts on rows sorted by expert, `scale` (T, 1) each row's update scale.
        counts None: offsets only (traceable); offs None too: every expert on every row, `scale` (T, E)
        then zero except at the row's expert."""
        a, b = self.lora_A[role], self.lora_B[role]
        x = self.lora_dropout(x.to(a.dtype))
        if offs is None:
            E, r = a.shape[:2]
            z = (x @ a.reshape(E * r, -1).t()).view(-1, E, r) * scale[:, :, None]  # (T, E, r)
            return z.view(-1, E * r) @ b.transpose(1, 2).reshape(E * r, -1)  # (T, out)
        if counts is None:
            return grouped_linear_offsets(grouped_linear_offsets(x, a, offs) * scale, b, offs)
        z = grouped_linear(x, a, counts, offs)  # (T, r)
        return grouped_linear(z * scale, b, counts, offs)  # (T, out)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (T, H)
        routing = self.router(flat)
        if self.forced_expert is not None:
            routing = self.force_routing(routing, shape)
        self.last_routing = routing
        sorted_expert, order = sort_pairs(routing.indices, None, self.num_experts)  # (T,) tokens grouped by expert
        xs = flat[order]  # (T, H) sorted
        # per-token scale of the expert update, (T, 1) in the LoRA dtype
        gate_w = routing.weights[:, 0][order] if self.scale_by_prob else torch.ones_like(order, dtype=torch.float32)
        scale = (gate_w * self.scaling).to(self.lora_A["up"].dtype)[:, None]
        path = dispatch_path(self.lora_A["up"].dtype, flat.device, self._lora_widths)
        if path == "grouped":
            counts, offs = None, sorted_offsets(sorted_expert, self.num_experts)
        elif path == "all_experts":
            counts = offs = None
            scale = F.one_hot(sorted_expert, self.num_experts).to(scale.dtype) * scale  # (T, E)
        else:
            counts = torch.bincount(sorted_expert, minlength=self.num_experts).tolist()
            offs = make_offsets(counts, flat.device)

        def proj(role: str, h: Tensor) -> Tensor:
            out = self._proj(role)(h)
            return out + self._lora(role, h, counts, offs, scale).to(out.dtype)

        if self.gated:
            h = self.act_fn(proj("gate", xs)) * proj("up", xs)
        else:
            h = self.act_fn(proj("up", xs))
        ys = proj("down", h)  # (T, H) sorted
        out = torch.empty_like(ys).index_copy_(0, order, ys)  # (T, H) back in token order
        return out.reshape(*shape[:-1], out.shape[-1])

    def force_routing(self, routing: RouterOutput, shape: torch.Size) -> RouterOutput:
        """The router's output with every token's expert replaced by its sample's `forced_expert`, weight 1."""
        forced = self.forced_expert.to(routing.indices.device)
        if forced.dim() != 1 or len(shape) < 2 or forced.shape[0] != shape[0]:
            raise ValueError(f"forced_expert of shape {tuple(forced.shape)} for an input of shape {tuple(shape)}: "
                             "one expert index per sample is needed")
        if forced.min() < 0 or forced.max() >= self.num_experts:
            raise ValueError(f"forced_expert {forced.tolist()} outside the {self.num_experts} experts")
        per_token = forced.view(-1, *([1] * (len(shape) - 2))).expand(shape[:-1]).reshape(-1, 1)  # (T, 1)
        return replace(routing, indices=per_token, weights=torch.ones_like(per_token, dtype=routing.weights.dtype))

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, r={self.r}, alpha={self.alpha}, scale_by_prob={self.scale_by_prob}"


register_adapter_kind(AdapterKind(name="mole", config=MoLEConfig, layer=MoLEMLP, target="mlp", wrapped="mlp"))
# LLaVA-MoLE's balance loss: `sum_i mean(p_i) * mean(c_i)`, c the straight-through one-hot of the top-1 choice,
# no xE (balanced value 1/E)
register_balance_form("mole", BalanceForm(all_slots=False, times_experts=False, straight_through=True))

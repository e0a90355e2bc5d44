"""LoRA adapters: plain `LoRALinear`, the LLaVA-MoLE MLP adapter `MoLEMLP`, and MoRA's `MoRALinear`.

All three wrap frozen base weights without copying them (the wrapped module stays reachable as
`base_layer` / `mlp`), so surgery can swap them in place and a state dict keeps the base keys.
`LoRALinear` uses peft's parameter layout (`lora_A.weight` (r, in), `lora_B.weight` (out, r),
`scaling = alpha / r`, A kaiming-uniform(a=sqrt 5), B zeros) so weights move between the two.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .grouped import grouped_linear, make_offsets
from .routing import RoutedLayer, TopKRouter

__all__ = ["LoRALinear", "MoLEMLP", "MoRALinear"]


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


# --------------------------------------------------------------------------- MoLE


def _mlp_layout(mlp: nn.Module) -> tuple[dict[str, nn.Linear], nn.Module, bool]:
    """Projections by role ('gate', 'up', 'down'), the activation, and whether it is gated."""
    if all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return {"gate": mlp.gate_proj, "up": mlp.up_proj, "down": mlp.down_proj}, mlp.act_fn, True
    if hasattr(mlp, "fc1") and hasattr(mlp, "fc2") and (hasattr(mlp, "activation_fn") or hasattr(mlp, "act")):
        act = mlp.activation_fn if hasattr(mlp, "activation_fn") else mlp.act
        return {"up": mlp.fc1, "down": mlp.fc2}, act, False
    found = sorted(n for n, _ in mlp.named_children())
    raise ValueError(
        f"cannot wrap {type(mlp).__name__}: expected gate_proj/up_proj/down_proj/act_fn or "
        f"fc1/fc2/(activation_fn|act); found submodules {found}"
    )


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
        projections, self.act_fn, self.gated = _mlp_layout(mlp)
        self.mlp = mlp.requires_grad_(False)
        self.num_experts, self.r, self.alpha, self.scaling = num_experts, r, alpha, alpha / r
        self.scale_by_prob = scale_by_prob
        hidden = projections["up"].in_features
        self.router = TopKRouter(hidden, num_experts, 1, normalize=False, bias=router_bias)
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

    def _proj(self, role: str) -> nn.Linear:
        names = {"gate": "gate_proj", "up": "up_proj" if self.gated else "fc1", "down": "down_proj" if self.gated else "fc2"}
        return getattr(self.mlp, names[role])

    def _lora(self, role: str, x: Tensor, counts: list[int], offs: Tensor, scale: Tensor) -> Tensor:
        a, b = self.lora_A[role], self.lora_B[role]
        x = self.lora_dropout(x.to(a.dtype))
        z = grouped_linear(x, a, counts, offs)  # (T, r)
        return grouped_linear(z * scale, b, counts, offs)  # (T, out)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (T, H)
        routing = self.router(flat)
        self.last_routing = routing
        expert = routing.indices[:, 0]  # (T,)
        order = torch.argsort(expert, stable=True)  # (T,) tokens grouped by expert
        counts = torch.bincount(expert, minlength=self.num_experts).tolist()
        offs = make_offsets(counts, flat.device)
        xs = flat[order]  # (T, H) sorted
        # per-token scale of the expert update, (T, 1) in the LoRA dtype
        gate_w = routing.weights[:, 0][order] if self.scale_by_prob else torch.ones_like(order, dtype=torch.float32)
        scale = (gate_w * self.scaling).to(self.lora_A["up"].dtype)[:, None]

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

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, r={self.r}, alpha={self.alpha}, scale_by_prob={self.scale_by_prob}"


# --------------------------------------------------------------------------- MoRA


class MoRALinear(nn.Module):
    """MoRA: a rank-R LoRA update read as R rank-1 experts, self-activated (no router).

    For token x, rank i has activation z_i = A_i x (A_i the i-th row of A). Our reading of
    `s_i = A_i x / sqrt(sum_j ||A_j x||^2)`: each A_j x is a scalar, so s = z / ||z||_2, the
    L2-normalised vector of rank activations (each s_i in [-1, 1]; sqrt(sum + 1e-12) for safety).
    w = softmax(s / temperature); budget: keep the top_k largest w (others 0); pruning: zero
    w_i where s_i < threshold. No renormalisation after masking.
        out = base(x) + scaling * sum_i w_i * B_i * z_i,   scaling = alpha / r (r of the first
    task, fixed, so adding ranks does not rescale the earlier ones)
    `add_task(r)` appends r ranks for a new task and freezes every earlier rank, whose values then
    stay bit-identical (no gradient ever reaches them). The ranks are stored per task:
    `lora_A[t]` (r_t, in), `lora_B[t]` (out, r_t).
    """

    def __init__(
        self,
        base: nn.Linear,
        r: int,
        alpha: float,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        threshold: float | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.base_layer = base.requires_grad_(False)
        self.alpha, self.temperature, self.top_k, self.threshold = alpha, temperature, top_k, threshold
        self.scaling = alpha / r
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        self.lora_dropout = _dropout(dropout)
        self.last_active_ranks: Tensor | None = None  # (...,) long, active ranks per token
        self.add_task(r)

    @property
    def r(self) -> int:
        return sum(a.shape[0] for a in self.lora_A)

    def add_task(self, r: int) -> None:
        """Append r rank-1 experts (A kaiming-uniform, B zeros) and freeze all earlier ones."""
        for p in list(self.lora_A) + list(self.lora_B):
            p.requires_grad_(False)
        w = self.base_layer.weight
        a = torch.empty(r, self.base_layer.in_features, device=w.device)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_A.append(nn.Parameter(a))
        self.lora_B.append(nn.Parameter(torch.zeros(self.base_layer.out_features, r, device=w.device)))

    def rank_weights(self, z: Tensor) -> Tensor:
        """w (..., R) from the rank activations z (..., R): normalise, softmax, budget, prune."""
        s = z / z.square().sum(dim=-1, keepdim=True).add(1e-12).sqrt()
        w = torch.softmax(s / self.temperature, dim=-1)
        keep = torch.ones_like(w, dtype=torch.bool)
        if self.top_k is not None and self.top_k < w.shape[-1]:
            top = w.topk(self.top_k, dim=-1).indices
            keep = torch.zeros_like(keep).scatter_(-1, top, True)
        if self.threshold is not None:
            keep = keep & (s >= self.threshold)
        self.last_active_ranks = keep.sum(dim=-1).detach()
        return w * keep

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)
        a = torch.cat(list(self.lora_A)) if len(self.lora_A) > 1 else self.lora_A[0]  # (R, in)
        b = torch.cat(list(self.lora_B), dim=1) if len(self.lora_B) > 1 else self.lora_B[0]  # (out, R)
        z = F.linear(self.lora_dropout(x.to(a.dtype)), a)  # (..., R)
        w = self.rank_weights(z)
        return out + (F.linear(w * z, b) * self.scaling).to(out.dtype)

    def extra_repr(self) -> str:
        ranks = [a.shape[0] for a in self.lora_A]
        return f"ranks per task={ranks}, temperature={self.temperature}, top_k={self.top_k}, threshold={self.threshold}"

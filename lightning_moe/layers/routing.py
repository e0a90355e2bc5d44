"""Routers and routing losses shared by every sparse layer.

A router turns token features into a `RouterOutput` (logits, probabilities, chosen experts and
their gate weights). Every routed module keeps its last `RouterOutput` in `last_routing`
(the `RoutedLayer` protocol), so a method collects the routing of all layers after one model
forward and computes the auxiliary losses here, in one place:

    routing = collect_routing(model)
    loss = lm_loss + 0.01 * load_balancing_loss(routing, mask) + 1e-3 * router_z_loss(routing, mask)

Routers compute in float32 whatever the input dtype or autocast state, as Switch/Mixtral do:
softmax and top-k over bf16 logits flip choices between nearly tied experts.

The load-balancing loss comes in registered forms (`BalanceForm`, `register_balance_form`): "switch"
and "gshard" here, and any form a layer's file registers beside the layer that uses it (an adapter
kind's, under `adapters/`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "RouterOutput",
    "TopKRouter",
    "RoutedLayer",
    "collect_routing",
    "BalanceForm",
    "register_balance_form",
    "balance_forms",
    "load_balancing_loss",
    "router_z_loss",
]


@dataclass
class RouterOutput:
    """One routed layer's decision for one forward pass (tokens are flattened: batch * seq)."""

    logits: Tensor  # (tokens, E) float32, before softmax
    probs: Tensor  # (tokens, E) float32, softmax(logits)
    indices: Tensor  # (tokens, k) long, chosen experts, slot 0 = the highest probability
    weights: Tensor  # (tokens, k) float32, gate weights applied to the experts' outputs
    dropped: Tensor | None = None  # (tokens, k) bool, True where capacity dropped the slot
    # expert parallelism (expert_parallel.py): the process group whose ranks share the batch; the routing losses
    # sum their statistics over it, so they are those of the whole batch
    group: Any = None

    @property
    def num_experts(self) -> int:
        return self.logits.shape[-1]

    @property
    def top_k(self) -> int:
        return self.indices.shape[-1]


class RoutedLayer:
    """Protocol mixin: a module that sets `self.last_routing` on every forward.

    Collect the routing of all layers after a model forward with `collect_routing(model)`.
    """

    last_routing: RouterOutput | None = None


def collect_routing(model: nn.Module) -> list[RouterOutput]:
    """`RouterOutput`s of every `RoutedLayer` in `model` (module order) from its last forward."""
    return [
        m.last_routing for m in model.modules() if isinstance(m, RoutedLayer) and m.last_routing is not None
    ]


class TopKRouter(nn.Module):
    """Linear router `proj: Linear(hidden, E)` followed by float32 softmax and top-k.

    normalize: renormalise the k gate weights to sum to 1 (Mixtral, MoE-LLaVA's top-2). With
        top_k=1 this makes every weight 1, as Hugging Face Mixtral does, and the router then
        learns only from the auxiliary losses; use normalize=False for Switch-style top-1 (x p).
    jitter: Switch-style multiplicative noise U(1-eps, 1+eps) on the router input in training
        (only the router sees it; Hugging Face Mixtral also perturbs the experts' input).
    noisy_second_choice: DeepSpeed top-2: in training, slots 2..k are the top of
        `logits + Gumbel noise` among the experts not chosen by slot 1; weights stay the
        clean probabilities of the chosen experts.
    """

    group: Any = None  # set by expert_parallel.shard_layer_experts; copied into every RouterOutput

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        *,
        normalize: bool = True,
        bias: bool = False,
        jitter: float = 0.0,
        noisy_second_choice: bool = False,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.num_experts, self.top_k = num_experts, top_k
        self.normalize, self.jitter, self.noisy_second_choice = normalize, jitter, noisy_second_choice
        self.proj = nn.Linear(hidden_size, num_experts, bias=bias, dtype=torch.float32)
        # A fresh router on an upcycled model must not prefer any expert: small weights.
        nn.init.normal_(self.proj.weight, std=init_std)
        if bias:
            nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> RouterOutput:
        x = x.reshape(-1, x.shape[-1])  # (tokens, hidden)
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            if self.training and self.jitter > 0:
                x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            bias = None if self.proj.bias is None else self.proj.bias.float()
            logits = F.linear(x, self.proj.weight.float(), bias)  # (tokens, E)
            probs = logits.softmax(dim=-1)
            if self.training and self.noisy_second_choice and self.top_k > 1:
                first = probs.argmax(dim=-1, keepdim=True)  # (tokens, 1)
                gumbel = -torch.log(-torch.log(torch.rand_like(logits).clamp_min(1e-20)))
                noisy = (logits.detach() + gumbel).scatter(-1, first, float("-inf"))
                rest = noisy.topk(self.top_k - 1, dim=-1).indices  # (tokens, k-1)
                indices = torch.cat([first, rest], dim=-1)
                weights = probs.gather(-1, indices)
            else:
                weights, indices = probs.topk(self.top_k, dim=-1)  # (tokens, k)
            if self.normalize:
                weights = weights / weights.sum(dim=-1, keepdim=True)
        return RouterOutput(logits=logits, probs=probs, indices=indices, weights=weights, group=self.group)

    def extra_repr(self) -> str:
        return f"top_k={self.top_k}, normalize={self.normalize}"


# ----------------------------------------------------------------------------- losses


def _as_list(routing: RouterOutput | Sequence[RouterOutput]) -> list[RouterOutput]:
    out = [routing] if isinstance(routing, RouterOutput) else list(routing)
    if not out:
        raise ValueError("no RouterOutput given")
    return out


def _flat_mask(mask: Tensor | None, tokens: int, device: torch.device) -> Tensor | None:
    if mask is None:
        return None
    mask = mask.reshape(-1).to(device=device, dtype=torch.float32)  # (tokens,) 1 = real token
    if mask.numel() != tokens:
        raise ValueError(f"mask has {mask.numel()} entries, routing has {tokens} tokens")
    return mask


@dataclass(frozen=True)
class BalanceForm:
    """One form of the load-balancing loss over real tokens, `E * sum_i f_i P_i` (or without the factor E):
    f_i is the share of routed slots that went to expert i (over tokens), P_i its mean router probability."""

    all_slots: bool  # f counts every top-k slot (True) or only each token's first choice (False)
    times_experts: bool = True  # the factor E in front (Switch, GShard); LLaVA-MoLE's form has none
    # f keeps its one-hot value but carries P's gradient (`onehot - p.detach() + p`), so the router
    # also learns through the assignment share
    straight_through: bool = False


_BALANCE_FORMS: dict[str, BalanceForm] = {}


def register_balance_form(name: str, form: BalanceForm, *, replace: bool = False) -> BalanceForm:
    """Make `form` available as `load_balancing_loss(..., form=name)` (and a method's `aux_loss.form`).
    Registering a taken name is an error unless `replace`."""
    if name in _BALANCE_FORMS and not replace and _BALANCE_FORMS[name] != form:
        raise ValueError(f"balance form {name!r} is already registered; pass replace=True to override it")
    _BALANCE_FORMS[name] = form
    return form


def balance_forms() -> dict[str, BalanceForm]:
    return dict(_BALANCE_FORMS)


# Hugging Face Mixtral: every top-k slot counts, balanced value k
register_balance_form("switch", BalanceForm(all_slots=True))
# DeepSpeed, the MoE-LLaVA reference: `mean_i(me_i * ce_i) * E^2` with ce from the top-1 choice, balanced value 1
register_balance_form("gshard", BalanceForm(all_slots=False))


def _balance_terms(r: RouterOutput, mask: Tensor | None, form: BalanceForm) -> tuple[Tensor, Tensor, Tensor]:
    """Per-expert (assignment sum, probability sum) over real tokens, and the real-token count."""
    probs, num_experts = r.probs, r.num_experts
    chosen = r.indices if form.all_slots else r.indices[:, :1]  # (tokens, slots)
    weight = torch.ones_like(chosen, dtype=probs.dtype) if mask is None else mask[:, None].expand_as(chosen)
    counts = probs.new_zeros(num_experts).scatter_add_(0, chosen.reshape(-1), weight.reshape(-1))  # (E,)
    if mask is None:
        prob_sum, n = probs.sum(dim=0), probs.new_tensor(float(probs.shape[0]))
    else:
        prob_sum, n = (probs * mask[:, None]).sum(dim=0), mask.sum()
    if r.group is None:
        return counts, prob_sum, n
    summed = _sum_over_group(torch.cat([counts, prob_sum, n[None]]), r.group)
    counts, prob_sum, n = summed.split([num_experts, num_experts, 1])
    return counts, prob_sum, n[0]


def _sum_over_group(stats: Tensor, group: Any) -> Tensor:
    """`stats` summed over the ranks of `group`, differentiably: the backward sums the gradients over the ranks
    too, and the data-parallel average of the router's gradients then gives those of the whole batch's loss."""
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(stats, group=group)


def load_balancing_loss(
    routing: RouterOutput | Sequence[RouterOutput],
    mask: Tensor | None = None,
    *,
    form: str = "switch",
    layers: str = "sum",
) -> Tensor:
    """Auxiliary load-balancing loss over real (mask == 1) tokens.

    form: the name of a registered `BalanceForm` (`balance_forms()`); those registered here:
      "switch": `E * sum_i f_i P_i`, f_i = (token, slot) pairs routed to expert i over all top-k
          slots / tokens, P_i = mean probability (Hugging Face Mixtral). Balanced value: k.
      "gshard": `mean_i(me_i * ce_i) * E^2` with ce from the top-1 choice (DeepSpeed, the
          MoE-LLaVA reference). Balanced value: 1.
    Counts use the choices the layer made (noisy second choice included) before any capacity
    drop, as DeepSpeed does.

    layers (for a sequence of RouterOutputs):
      "sum" (default): per-layer losses summed, so a balanced model scores n_layers x the
          balanced value (16 balanced GShard layers -> 16).
      "mean": the per-layer average.
      "concat": one loss over all layers' tokens pooled, which is what Hugging Face's
          `load_balancing_loss_func` computes from its tuple of gate logits.
    """
    if form not in _BALANCE_FORMS:
        raise ValueError(f"form must be one of {sorted(_BALANCE_FORMS)} (register_balance_form adds one), got {form!r}")
    if layers not in ("sum", "mean", "concat"):
        raise ValueError(f"layers must be 'sum', 'mean' or 'concat', got {layers!r}")
    balance = _BALANCE_FORMS[form]
    outs = _as_list(routing)
    per_layer: list[tuple[Tensor, Tensor, Tensor]] = []
    for r in outs:
        m = _flat_mask(mask, r.probs.shape[0], r.probs.device)
        counts, prob_sum, n = _balance_terms(r, m, balance)
        if balance.straight_through:
            # straight-through: value = one-hot counts, gradient = that of the soft probabilities
            counts = counts.detach() - prob_sum.detach() + prob_sum
        per_layer.append((counts, prob_sum, n))
    if layers == "concat":
        per_layer = [tuple(torch.stack(t).sum(0) for t in zip(*per_layer))]  # type: ignore[misc]
    losses = []
    for counts, prob_sum, n in per_layer:
        n = n.clamp_min(1.0)
        f, p = counts / n, prob_sum / n  # (E,), (E,)
        scale = float(outs[0].num_experts) if balance.times_experts else 1.0
        losses.append(scale * (f * p).sum())
    total = torch.stack(losses).sum()
    return total / len(losses) if layers == "mean" else total


def router_z_loss(routing: RouterOutput | Sequence[RouterOutput], mask: Tensor | None = None) -> Tensor:
    """ST-MoE router z-loss: mean over real tokens of logsumexp(logits)^2, summed over layers."""
    total = None
    for r in _as_list(routing):
        z2 = torch.logsumexp(r.logits.float(), dim=-1).square()  # (tokens,)
        m = _flat_mask(mask, z2.shape[0], z2.device)
        if r.group is None:
            loss = z2.mean() if m is None else (z2 * m).sum() / m.sum().clamp_min(1.0)
        else:  # the mean over every rank's real tokens
            real = torch.ones_like(z2) if m is None else m
            total_z2, n = _sum_over_group(torch.stack([(z2 * real).sum(), real.sum()]), r.group)
            loss = total_z2 / n.clamp_min(1.0)
        total = loss if total is None else total + loss
    return total


def expert_capacity(tokens: int, num_experts: int, top_k: int, capacity_factor: float, min_capacity: int) -> int:
    """DeepSpeed's rule: `max(ceil(tokens / E * capacity_factor * k), min_capacity)`."""
    return max(math.ceil(tokens / num_experts * capacity_factor * top_k), min_capacity)


def capacity_drop(indices: Tensor, num_experts: int, capacity: int) -> Tensor:
    """(tokens, k) bool mask of the (token, slot) pairs that overflow their expert's capacity.

    Queue order inside each expert follows DeepSpeed's top-2 gating: all slot-0 (first choice)
    pairs in token order, then all slot-1 pairs in token order, and so on; a pair whose position
    in its expert's queue is >= capacity is dropped. So first choices always win over second
    choices, and earlier tokens over later ones.
    """
    tokens, k = indices.shape
    slot_major = indices.t().reshape(-1)  # (k * tokens,) slot 0 of every token first
    onehot = F.one_hot(slot_major, num_experts)  # (k * tokens, E), small: E columns
    position = (onehot.cumsum(dim=0) - 1).gather(1, slot_major[:, None]).squeeze(1)  # queue position
    return (position >= capacity).reshape(k, tokens).t()

"""`SparseMoE`: a top-k mixture of FFN experts, a drop-in replacement for a decoder's MLP.

Experts are stacked parameters, one tensor per projection, in Hugging Face Mixtral's layout:
  gated (SwiGLU):  gate_up_proj (E, 2I, H) [gate rows first, then up], down_proj (E, H, I)
  plain (fc1/fc2): up_proj (E, I, H), down_proj (E, H, I)
  optional biases: gate_up_bias (E, 2I) or up_bias (E, I), and down_bias (E, H).

An optional shared expert (Qwen2-MoE) sees every token: its output, scaled by a sigmoid gate
`sigmoid(shared_expert_gate(x))` when there is one, is added to the routed experts' sum.
`from_experts` copies a Hugging Face MoE block's tensors (models/architecture.py knows where each
family keeps them); `from_dense` upcycles a dense MLP.

Dispatch is dropless by default: the (token, slot) pairs are sorted by expert, each expert runs
one matmul on its contiguous slice, the outputs are scaled by the gate weights and summed back
into their tokens. A capacity factor turns on DeepSpeed-style token dropping (see
`routing.capacity_drop` for exactly which pairs drop): dropped pairs sort last, into a sentinel
group no expert computes. `SparseMoE.dispatch_path` picks one of three implementations:
  "grouped"      per-expert offsets as a tensor and `F.grouped_mm` (`run_sorted_experts`): no host
                 synchronisation, so `torch.compile` traces it in one graph;
  "sorted"       per-expert counts as Python ints and one custom autograd node (`_ExpertFFN`),
                 in eager where grouped_mm cannot trace (float32: the fastest on the CPU);
  "all_experts"  every expert on every token, for a trace where grouped_mm cannot be traced.
docs/performance.md says which dtype and device takes which.

Mixed precision: the router always computes in float32 (its weights are stored in float32);
the experts compute in the input dtype, or in the autocast dtype when autocast is on; the output
has the input's dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .expert_parallel import expert_parallel_forward
from .grouped import (
    combine_pairs,
    dispatch_path,
    inverse_permutation,
    is_silu,
    linear_groups,
    make_offsets,
    mm_groups,
    run_sorted_experts,
    sort_pairs,
    sorted_offsets,
    weight_grad_groups,
)
from .mlp import GatedMLP, mlp_layout
from .routing import RoutedLayer, TopKRouter, capacity_drop, expert_capacity

__all__ = ["SparseMoE", "get_activation", "run_sorted_experts"]


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), CLIP's activation."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "gelu": nn.GELU,
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "relu": nn.ReLU,
    "quick_gelu": QuickGELU,
}


def get_activation(activation: str | nn.Module) -> nn.Module:
    """An activation module by Hugging Face name ('silu', 'gelu', 'gelu_new', ...), or the module itself."""
    if isinstance(activation, nn.Module):
        return activation
    if activation not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; known: {sorted(_ACTIVATIONS)} (or pass a module)")
    return _ACTIVATIONS[activation]()


class _ExpertFFN(torch.autograd.Function):
    """gather -> grouped up/gate_up -> activation -> grouped down -> x gate weight -> sum per token.

    One autograd node for the whole expert computation. Compared with composing the ops under
    autograd this avoids: the index_put backward of the gather, the chunk/cat of the gate/up
    halves (the SwiGLU gradient is written straight into one (S, 2I) buffer), and a node per
    small op (which dominates at a few hundred tokens). Saved for backward, as autograd would
    for a dense SwiGLU: the pre-activation h (S, N), silu(gate) (S, I), the activation a (S, I)
    and the expert outputs y (S, H); the gathered input rows are recomputed from x.
    """

    @staticmethod
    def forward(ctx, x, w_in, w_down, b_in, b_down, pair_w, token, expert, inverse, counts, offs, act, gated):
        # x (T, H); w_in (E, N, H) with N = 2I (gated) or I; w_down (E, H, I)
        # pair_w, token, expert: (S,) gate weight, token and expert of each kept pair, sorted by expert
        # inverse: (T*k,) position in the sorted order of pair t*k+s when no pair was dropped, else None
        xs = x.index_select(0, token)  # (S, H)
        h = linear_groups(xs, w_in, counts, offs)  # (S, N), maybe column-major
        if b_in is not None:
            h = h + b_in.index_select(0, expert)
        if gated:
            gate, up = h.chunk(2, dim=-1)  # (S, I) views
            act_out = F.silu(gate) if is_silu(act) else act(gate)
            a = act_out * up
        else:
            act_out = None
            a = act(h)
        y = linear_groups(a, w_down, counts, offs)  # (S, H)
        if b_down is not None:
            y = y + b_down.index_select(0, expert)
        out = combine_pairs(y, pair_w, token, inverse, x.shape)
        ctx.save_for_backward(x, w_in, w_down, pair_w, token, expert, inverse, h, act_out, a, y)
        ctx.counts, ctx.offs, ctx.act, ctx.gated = counts, offs, act, gated
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, w_in, w_down, pair_w, token, expert, inverse, h, act_out, a, y = ctx.saved_tensors
        counts, offs, need = ctx.counts, ctx.offs, ctx.needs_input_grad
        E = w_in.shape[0]
        go = grad_out.contiguous().index_select(0, token)  # (S, H) upstream gradient of each pair's token
        grad_pair_w = torch.linalg.vecdot(go, y) if need[5] else None  # (S,) <dL/dout_t, y_p>
        gy = go.mul_(pair_w[:, None])  # (S, H) gradient of y
        grad_w_down = weight_grad_groups(gy, a, counts, w_down, offs) if need[2] else None
        grad_b_down = y.new_zeros(E, y.shape[1]).index_add_(0, expert, gy) if need[4] else None
        ga = mm_groups(gy, w_down, counts, offs)  # (S, I)
        gh = _activation_grad(h, act_out, ga, ctx.act, ctx.gated)  # (S, N)
        grad_b_in = h.new_zeros(E, h.shape[1]).index_add_(0, expert, gh) if need[3] else None
        xs = x.index_select(0, token)  # (S, H)
        grad_w_in = weight_grad_groups(gh, xs, counts, w_in, offs) if need[1] else None
        grad_x = combine_pairs(mm_groups(gh, w_in, counts, offs), None, token, inverse, x.shape) if need[0] else None
        return grad_x, grad_w_in, grad_w_down, grad_b_in, grad_b_down, grad_pair_w, *([None] * 7)


def _activation_grad(h: Tensor, act_out: Tensor | None, ga: Tensor, act: nn.Module, gated: bool) -> Tensor:
    """Gradient w.r.t. the pre-activation h (S, N) given the gradient ga (S, I) of the activation."""
    if gated and is_silu(act):
        gate, up = h.chunk(2, dim=-1)
        half = gate.shape[1]
        gh = h.new_empty(h.shape)  # row-major whatever h's layout, for the grouped matmuls
        torch.mul(ga, act_out, out=gh[:, half:])  # d/d up = ga * silu(gate)
        torch.ops.aten.silu_backward.grad_input(ga * up, gate, grad_input=gh[:, :half])
        return gh
    with torch.enable_grad():  # any other activation: let autograd differentiate it
        hd = h.detach().requires_grad_()
        if gated:
            gate, up = hd.chunk(2, dim=-1)
            a = act(gate) * up
        else:
            a = act(hd)
        (gh,) = torch.autograd.grad(a, hd, ga)
    return gh.contiguous()


def _compute_dtype(x: Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type) and x.is_floating_point():
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class SparseMoE(nn.Module, RoutedLayer):
    """Top-k mixture of E FFN experts with a float32 linear router (`router.proj.weight`)."""

    # the process group this layer's experts are split over (expert_parallel.shard_layer_experts); None: all local
    expert_group = None

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        *,
        gated: bool = True,
        activation: str | nn.Module = "silu",
        bias: bool = False,
        normalize_weights: bool = True,
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None = None,
        min_capacity: int = 4,
        router_jitter: float = 0.0,
        noisy_second_choice: bool = False,
        shared_expert_size: int | None = None,
        shared_expert_gate: bool = False,
    ) -> None:
        """shared_expert_size: intermediate size of a gated shared expert that every token goes through
        (Qwen2-MoE); shared_expert_gate: scale its output by sigmoid(Linear(hidden, 1)(x))."""
        super().__init__()
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.num_experts, self.top_k, self.gated = num_experts, top_k, gated
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.min_capacity = min_capacity
        self.router = TopKRouter(
            hidden_size,
            num_experts,
            top_k,
            normalize=normalize_weights,
            jitter=router_jitter,
            noisy_second_choice=noisy_second_choice,
        )
        self.act_fn = get_activation(activation)
        E, H, I = num_experts, hidden_size, intermediate_size
        up_rows = 2 * I if gated else I
        self.register_parameter("gate_up_proj" if gated else "up_proj", nn.Parameter(torch.empty(E, up_rows, H)))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))
        if bias:
            self.register_parameter("gate_up_bias" if gated else "up_bias", nn.Parameter(torch.zeros(E, up_rows)))
            self.down_bias = nn.Parameter(torch.zeros(E, H))
        else:
            self.register_parameter("gate_up_bias" if gated else "up_bias", None)
            self.down_bias = None
        if shared_expert_gate and not shared_expert_size:
            raise ValueError("shared_expert_gate needs a shared expert (shared_expert_size)")
        self.shared_expert = GatedMLP(H, shared_expert_size, get_activation(activation)) if shared_expert_size else None
        self.shared_expert_gate = nn.Linear(H, 1, bias=False) if shared_expert_gate else None
        self.reset_parameters()
        self.last_routing = None

    # ------------------------------------------------------------------ parameters

    @property
    def w_in(self) -> Tensor:
        return self.gate_up_proj if self.gated else self.up_proj

    @property
    def b_in(self) -> Tensor | None:
        return self.gate_up_bias if self.gated else self.up_bias

    def reset_parameters(self) -> None:
        # same distribution as nn.Linear's default, expert by expert
        for w in (self.w_in, self.down_proj):
            bound = 1.0 / w.shape[-1] ** 0.5
            nn.init.uniform_(w, -bound, bound)

    def extra_repr(self) -> str:
        return (
            f"hidden={self.hidden_size}, intermediate={self.intermediate_size}, experts={self.num_experts}, "
            f"top_k={self.top_k}, gated={self.gated}, "
            f"capacity_factor={self.capacity_factor}, shared_expert={self.shared_expert is not None}"
        )

    # ------------------------------------------------------------------ forward

    def _capacity(self, tokens: int) -> int | None:
        cf = self.capacity_factor if self.training else (self.eval_capacity_factor or self.capacity_factor)
        if cf is None:
            return None
        return expert_capacity(tokens, self.num_experts, self.top_k, cf, self.min_capacity)

    def forward(self, x: Tensor) -> Tensor:
        shape, in_dtype = x.shape, x.dtype
        flat = x.reshape(-1, shape[-1])  # (T, H)
        routing = self.router(flat)
        weights, indices = routing.weights, routing.indices  # (T, k) each
        capacity = self._capacity(flat.shape[0])
        if capacity is not None:
            routing.dropped = capacity_drop(indices, self.num_experts, capacity)
            weights = weights.masked_fill(routing.dropped, 0.0)
            if self.router.normalize:
                # DeepSpeed renormalises over the kept slots; a fully dropped token outputs 0
                weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).eps)
            routing.weights = weights
        self.last_routing = routing

        if flat.shape[0] == 0:  # an empty batch: nothing to route (views below need T > 0)
            return x.new_zeros(shape)
        dtype = _compute_dtype(x)
        out = self._experts(flat.to(dtype), indices, weights, routing.dropped)
        if self.shared_expert is not None:
            out = out + self._shared(flat.to(dtype))
        return out.to(in_dtype).reshape(shape)

    def _shared(self, flat: Tensor) -> Tensor:
        """The shared expert's output (T, H), gated by sigmoid(gate(x)) (T, 1) when there is a gate."""
        out = self.shared_expert(flat)
        if self.shared_expert_gate is not None:
            out = torch.sigmoid(self.shared_expert_gate(flat)) * out
        return out

    def dispatch_path(self, dtype: torch.dtype, device: torch.device) -> str:
        """The expert dispatch `forward` takes for inputs computed in `dtype` on `device`.

        `grouped.dispatch_path` over the hidden and intermediate sizes: "grouped" (`_experts_grouped`) where
        grouped_mm traces for the dtype (bfloat16 in torch 2.13) and hidden and intermediate rows are multiples
        of 16 bytes, in eager and under compile. Elsewhere under `torch.compile` "all_experts", in eager
        "sorted" (float32 on the CPU, where its custom backward is the fastest). A subclass that overrides
        `expert_weights` (its experts are picked by the Python counts) always takes "sorted".
        """
        if type(self).expert_weights is not SparseMoE.expert_weights:
            return "sorted"
        return dispatch_path(dtype, device, (self.hidden_size, self.intermediate_size))

    def _experts(self, flat: Tensor, indices: Tensor, weights: Tensor, dropped: Tensor | None) -> Tensor:
        if self.expert_group is not None:
            return expert_parallel_forward(self, flat, indices, weights, dropped)
        path = self.dispatch_path(flat.dtype, flat.device)
        if path == "grouped":
            return self._experts_grouped(flat, indices, weights, dropped)
        if path == "all_experts":
            return self._experts_traceable(flat, indices, weights)
        return self._experts_sorted(flat, indices, weights, dropped)

    def _experts_grouped(self, flat: Tensor, indices: Tensor, weights: Tensor, dropped: Tensor | None) -> Tensor:
        """Sorted dispatch with the per-expert offsets as a tensor (`run_sorted_experts`): the expert
        FLOPs of the eager dispatch, no host synchronisation, traceable. Dropped pairs sort into a
        sentinel group E after every expert's rows and are not computed."""
        T, k = indices.shape
        dtype = flat.dtype
        sorted_expert, order = sort_pairs(indices, dropped, self.num_experts)  # (T*k,)
        offsets = sorted_offsets(sorted_expert, self.num_experts)  # (E,) int32
        cast = lambda p: None if p is None else p.to(dtype)  # noqa: E731  (no-op unless autocast)
        y = run_sorted_experts(flat.index_select(0, order // k), offsets, cast(self.w_in), cast(self.down_proj),
                               cast(self.b_in), cast(self.down_bias), self.act_fn, self.gated,
                               masked_tail=dropped is not None)  # (T*k, H) in sorted order
        # (T, k, H) back in pair order; dropped rows are 0
        rows = y.index_select(0, inverse_permutation(order)).view(T, k, -1)
        return torch.bmm(weights.to(dtype).view(T, 1, k), rows).view(T, -1)

    def _experts_sorted(self, flat: Tensor, indices: Tensor, weights: Tensor, dropped: Tensor | None) -> Tensor:
        k = indices.shape[1]
        dtype = flat.dtype
        # dropped pairs go to a sentinel group E that sorts last and is never computed
        sorted_expert, order = sort_pairs(indices, dropped, self.num_experts)  # (S,) grouped by expert
        counts = torch.bincount(sorted_expert, minlength=self.num_experts + 1).tolist()
        kept = sum(counts[: self.num_experts])
        counts = counts[: self.num_experts]
        order, sorted_expert = order[:kept], sorted_expert[:kept]  # (S_kept,)
        token = order // k  # (S_kept,) token of each sorted pair
        pair_w = weights.reshape(-1)[order].to(dtype)  # (S_kept,)
        inverse = inverse_permutation(order) if dropped is None else None  # (T*k,)
        w_in, w_down, b_in, b_down, counts, sorted_expert = self.expert_weights(counts, sorted_expert)
        offs = make_offsets(counts, flat.device)
        cast = lambda p: None if p is None else p.to(dtype)  # noqa: E731  (no-op unless autocast)
        return _ExpertFFN.apply(
            flat, cast(w_in), cast(w_down), cast(b_in), cast(b_down),
            pair_w, token, sorted_expert, inverse, counts, offs, self.act_fn, self.gated,
        )

    def _experts_traceable(self, flat: Tensor, indices: Tensor, weights: Tensor) -> Tensor:
        """The dispatch `torch.compile` traces where grouped_mm cannot (float32 in torch 2.13): static
        shapes and no host synchronisation, so no graph break.

        Every expert runs on every token and the outputs are summed with a (T, E) gate matrix that is
        zero where a token did not choose the expert or its pair was dropped (`weights` is already 0
        there). The same numbers as the sorted dropless dispatch up to summation order, at E / k times its
        expert FLOPs (docs/running_at_scale.md, torch.compile).
        """
        dtype = flat.dtype
        gates = weights.new_zeros(flat.shape[0], self.num_experts).scatter_add(1, indices, weights).to(dtype)  # (T, E)
        h = torch.matmul(flat, self.w_in.to(dtype).transpose(1, 2))  # (T, H) @ (E, H, N) -> (E, T, N)
        if self.b_in is not None:
            h = h + self.b_in.to(dtype)[:, None]
        if self.gated:
            gate, up = h.chunk(2, dim=-1)  # (E, T, I) each
            a = self.act_fn(gate) * up
        else:
            a = self.act_fn(h)
        y = torch.matmul(a, self.down_proj.to(dtype).transpose(1, 2))  # (E, T, I) @ (E, I, H) -> (E, T, H)
        if self.down_bias is not None:
            y = y + self.down_bias.to(dtype)[:, None]
        return torch.einsum("te,eth->th", gates, y)

    def expert_weights(
        self, counts: list[int], sorted_expert: Tensor
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, list[int], Tensor]:
        """The stacked expert weights dispatch runs on, given the pairs per expert `counts` (E,).

        Returns (w_in, w_down, b_in, b_down, counts, sorted_expert). Here: all E resident experts,
        unchanged. A subclass that keeps experts elsewhere (lightning_moe.inference's offloaded
        layer) returns a stack of only the experts with pairs, with `counts` and `sorted_expert`
        renumbered to that stack, and reuses the routing and dispatch above unchanged.
        """
        return self.w_in, self.down_proj, self.b_in, self.down_bias, counts, sorted_expert

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_dense(cls, mlp: nn.Module, num_experts: int, top_k: int, **kwargs) -> SparseMoE:
        """Upcycle a dense MLP: every expert an exact copy, the router new (small init).

        Recognised layouts: `mlp.mlp_layout` (gated gate/up/down, or fc1/fc2).
        Since the gate weights of a token sum to 1 (normalize_weights, the default) and every
        expert is the same function, the output equals the dense MLP's up to float rounding.
        """
        try:
            layout = mlp_layout(mlp)
        except ValueError as err:
            raise ValueError(f"cannot upcycle: {err}") from err
        gate, up, down = (layout.projections.get(role) for role in ("gate", "up", "down"))
        act, gated = layout.activation, layout.gated
        for lin in (gate, up, down):
            if lin is not None and not isinstance(lin, nn.Linear):
                raise ValueError(f"cannot upcycle {type(mlp).__name__}: {type(lin).__name__} is not nn.Linear")
        has_bias = any(lin is not None and lin.bias is not None for lin in (gate, up, down))
        moe = cls(
            up.in_features,
            up.out_features,
            num_experts,
            top_k,
            gated=gated,
            activation=act,
            bias=has_bias,
            **kwargs,
        ).to(device=up.weight.device)
        with torch.no_grad():
            w_in = torch.cat([gate.weight, up.weight]) if gated else up.weight  # (2I, H) or (I, H)
            moe.w_in.copy_(w_in.expand_as(moe.w_in))
            moe.down_proj.copy_(down.weight.expand_as(moe.down_proj))
            if has_bias:
                zeros = lambda lin: torch.zeros(lin.out_features, device=lin.weight.device)  # noqa: E731
                b_of = lambda lin: lin.bias if lin.bias is not None else zeros(lin)  # noqa: E731
                b_in = torch.cat([b_of(gate), b_of(up)]) if gated else b_of(up)
                moe.b_in.copy_(b_in.expand_as(moe.b_in))
                moe.down_bias.copy_(b_of(down).expand_as(moe.down_bias))
        # experts follow the dense weights' dtype; the router stays float32
        moe.w_in.data = moe.w_in.data.to(up.weight.dtype)
        moe.down_proj.data = moe.down_proj.data.to(up.weight.dtype)
        return moe

    @classmethod
    def from_experts(
        cls,
        router_weight: Tensor,
        gate_up_proj: Tensor,
        down_proj: Tensor,
        top_k: int,
        *,
        activation: str | nn.Module = "silu",
        normalize_weights: bool = True,
        shared_expert: nn.Module | None = None,
        shared_expert_gate: Tensor | None = None,
        **kwargs,
    ) -> SparseMoE:
        """A copy of a Hugging Face (transformers 5) MoE block given its tensors: the router weight
        (E, H), the stacked experts gate_up_proj (E, 2I, H) [gate rows first] and down_proj (E, H, I),
        optionally a gated shared expert (an MLP `mlp_layout` reads) and its sigmoid gate's weight (1, H).

        Every family here (Mixtral, Qwen2/3-MoE, OLMoE) routes as `TopKRouter` does: softmax over all
        E logits in float32, top-k, then renormalise the k weights iff `normalize_weights`
        (Mixtral always; the others when their config's `norm_topk_prob` is set).
        """
        E, two_i, H = gate_up_proj.shape
        if router_weight.shape != (E, H) or down_proj.shape != (E, H, two_i // 2):
            raise ValueError(f"expert tensors do not fit together: router {tuple(router_weight.shape)}, "
                             f"gate_up_proj {tuple(gate_up_proj.shape)}, down_proj {tuple(down_proj.shape)}")
        shared = None
        if shared_expert is not None and mlp_layout(shared_expert).projections["up"].out_features == 0:
            # a zero-width shared expert (how a Qwen2-MoE config says "none") adds gate * 0 = 0: drop it
            shared_expert = shared_expert_gate = None
        if shared_expert is not None:
            layout = mlp_layout(shared_expert)
            if not layout.gated or any(lin.bias is not None for lin in layout.projections.values()):
                raise ValueError(f"the shared expert {type(shared_expert).__name__} is not a bias-free gated MLP")
            shared = layout.projections
        moe = cls(H, two_i // 2, E, top_k, gated=True, activation=activation, normalize_weights=normalize_weights,
                  shared_expert_size=None if shared is None else shared["up"].out_features,
                  shared_expert_gate=shared_expert_gate is not None, **kwargs).to(gate_up_proj.device)
        with torch.no_grad():
            moe.router.proj.weight.copy_(router_weight.float())
            moe.gate_up_proj.data = gate_up_proj.detach().clone()
            moe.down_proj.data = down_proj.detach().clone()
            if shared is not None:
                for role, lin in shared.items():
                    getattr(moe.shared_expert, f"{role}_proj").weight.data = lin.weight.detach().clone()
            if shared_expert_gate is not None:
                moe.shared_expert_gate.weight.data = shared_expert_gate.detach().clone()
        return moe

    @classmethod
    def from_mixtral(cls, block: nn.Module, **kwargs) -> SparseMoE:
        """Copy a Hugging Face (transformers 5) `MixtralSparseMoeBlock`: block.gate.weight (E, H),
        block.experts.gate_up_proj (E, 2I, H), block.experts.down_proj (E, H, I)."""
        try:
            router_w, experts = block.gate.weight, block.experts
            gate_up, down = experts.gate_up_proj, experts.down_proj
        except AttributeError as err:
            raise ValueError(
                f"{type(block).__name__} is not a transformers-5 MixtralSparseMoeBlock "
                "(needs gate.weight, experts.gate_up_proj, experts.down_proj)"
            ) from err
        top_k = getattr(block, "top_k", None) or getattr(block.gate, "top_k")
        return cls.from_experts(router_w, gate_up, down, top_k, activation=getattr(experts, "act_fn", "silu"), **kwargs)

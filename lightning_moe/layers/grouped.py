"""Grouped linear: one matmul per expert over rows already sorted by expert.

`grouped_linear(x, weight, counts)` computes `x[rows of e] @ weight[e].T` for every expert e
whose rows are a contiguous slice of `x`. It is the one primitive under `SparseMoE` and the
LoRA experts of `MoLEMLP`. The forward uses `torch.nn.functional.grouped_mm` where this torch
supports it for the dtype/device/strides, else a loop over the experts that received rows.

The backward is a custom autograd Function because autograd through per-expert slices
(`weight[e]`) materialises a full zero (E, N, K) gradient per expert and adds them up, which is
why a naive loop costs E x the weight bytes. Here the weight gradient is written once, slice by
slice, into one uninitialised buffer; only experts with no rows are zero-filled.

These take the row counts as Python ints (a host synchronisation, a graph break under
`torch.compile`). The traceable variant, `grouped_linear_offsets`, takes only the int32 offsets
tensor (`sorted_offsets`), with a backward of two grouped_mm calls (`_GroupedLinearOffsets`);
it traces wherever `grouped_mm_compiles(dtype, device)` holds.

Around them, what every sorted dispatch shares (`SparseMoE`, its expert-parallel exchange, `MoLEMLP`):
`dispatch_path` picks the implementation, `sort_pairs` groups the (token, slot) pairs by expert and
`inverse_permutation` undoes the sort, `run_sorted_experts` is the experts' FFN on sorted rows, and
`combine_pairs` sums the pairs' outputs back into their tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["grouped_linear", "grouped_linear_offsets", "grouped_mm_compiles", "grouped_mm_supported", "linear_groups",
           "mm_groups", "weight_grad_groups", "make_offsets", "offsets_dispatch", "dispatch_path", "sorted_offsets",
           "sort_pairs", "inverse_permutation", "run_sorted_experts", "combine_pairs"]

_HAS_GROUPED_MM = hasattr(F, "grouped_mm")
# dtypes for which this torch build has a grouped_mm kernel on each device type, probed lazily
_PROBED: dict[tuple[str, torch.dtype], bool] = {}
# dtypes grouped_mm's meta function (what torch.compile traces with) accepts, probed lazily
_META_PROBED: dict[torch.dtype, bool] = {}


def _probe(device: torch.device, dtype: torch.dtype) -> bool:
    key = (device.type, dtype)
    if key not in _PROBED:
        ok = False
        if _HAS_GROUPED_MM:
            try:
                a = torch.ones(8, 8, device=device, dtype=dtype)
                b = torch.ones(2, 8, 8, device=device, dtype=dtype)
                offs = torch.tensor([3, 8], device=device, dtype=torch.int32)
                ok = bool(torch.allclose(F.grouped_mm(a, b, offs=offs).float(), torch.full((8, 8), 8.0, device=device)))
            except (RuntimeError, NotImplementedError, TypeError):
                ok = False
        _PROBED[key] = ok
    return _PROBED[key]


def _probe_meta(dtype: torch.dtype) -> bool:
    if dtype not in _META_PROBED:
        ok = False
        if _HAS_GROUPED_MM:
            try:
                a = torch.empty(8, 8, device="meta", dtype=dtype)
                b = torch.empty(2, 8, 8, device="meta", dtype=dtype)
                F.grouped_mm(a, b, offs=torch.empty(2, device="meta", dtype=torch.int32))
                ok = True
            except (RuntimeError, NotImplementedError, TypeError):
                ok = False
        _META_PROBED[dtype] = ok
    return _META_PROBED[dtype]


def grouped_mm_compiles(dtype: torch.dtype, device: torch.device) -> bool:
    """True when `F.grouped_mm` runs for `dtype` on `device`'s type and `torch.compile` can trace it.

    Both are probed once and cached: the kernel (eager) and the meta function that fake tensors
    use while tracing. torch 2.13's meta function accepts only bfloat16, while its CPU kernel
    also runs float32: float32 grouped_mm works in eager but not under compile. A trace calls this
    as a constant (it runs the probes outside the graph), never tracing them.
    """
    return _probe(torch.device(device), dtype) and _probe_meta(dtype)


# What `torch.compiler.assume_constant_result` does, without importing torch._dynamo (and numpy with
# it) when layers/ is imported; tests/layers/test_compile.py checks that the marker is still this one
grouped_mm_compiles._dynamo_marked_constant = True


def offsets_dispatch(dtype: torch.dtype, device: torch.device, sizes: tuple[int, ...]) -> bool:
    """Whether grouped experts take the tensor-offsets path (`grouped_linear_offsets`), in eager and under
    `torch.compile` alike: where `grouped_mm_compiles(dtype, device)` and every row width in `sizes` is a
    multiple of 16 bytes. There it traces, costs no host synchronisation, and in bfloat16 on the CPU it
    also measured faster in eager than the Python-counts path (docs/performance.md).
    """
    align = 16 // dtype.itemsize
    return grouped_mm_compiles(dtype, device) and all(n % align == 0 for n in sizes)


def dispatch_path(dtype: torch.dtype, device: torch.device, sizes: tuple[int, ...]) -> str:
    """Which grouped dispatch experts with row widths `sizes` take for inputs computed in `dtype` on `device`.

    "grouped" (tensor offsets, `grouped_linear_offsets`) where `offsets_dispatch` says so, in eager and under
    compile; elsewhere under `torch.compile` "all_experts" (every expert on every row, traceable), in eager
    "sorted" (per-expert counts as Python ints, `grouped_linear`).
    """
    if offsets_dispatch(dtype, device, sizes):
        return "grouped"
    return "all_experts" if torch.compiler.is_compiling() else "sorted"


def _aligned(t: Tensor) -> bool:
    # the CPU/CUDA kernels require 16-byte aligned base pointers and strides, except the innermost
    # (unit-stride) dimension's; size-1 dimensions count too (a rank-1 LoRA's (S, 1) activations
    # have a 4-byte row stride, which the kernel rejects)
    size, strides = t.element_size(), t.stride()
    innermost = max(i for i, s in enumerate(strides) if s == min(strides))
    return t.data_ptr() % 16 == 0 and all((s * size) % 16 == 0 for i, s in enumerate(strides) if i != innermost)


def grouped_mm_supported(x: Tensor, w: Tensor) -> bool:
    """True when `F.grouped_mm(x, w, offs=...)` runs on these tensors (dtype, device, alignment)."""
    return x.dtype == w.dtype and _probe(x.device, x.dtype) and _aligned(x) and _aligned(w)


def mm_groups(x: Tensor, w: Tensor, counts: list[int], offs: Tensor | None) -> Tensor:
    """(S, K) x grouped (E, K, N) -> (S, N); rows of x sorted by group, counts[e] rows each."""
    if offs is not None and grouped_mm_supported(x, w):
        return F.grouped_mm(x, w, offs=offs)
    out = x.new_empty(x.shape[0], w.shape[-1])
    start = 0
    for e, c in enumerate(counts):
        if c:
            torch.mm(x[start : start + c], w[e], out=out[start : start + c])
            start += c
    return out


# With few rows per expert and large expert weights, `w[e] @ x_e.T` beats `x_e @ w[e].T` and
# grouped_mm on CPU: MKL then streams the weight once as the left operand instead of packing it
# (measured on 2 cores: 3.9x at 4 rows x (2048, 512) weights, 1.5x at 16 rows, no gain and a
# column-major output that slows what follows for (512, 128) weights)
SMALL_ROWS_PER_EXPERT = 32
LARGE_EXPERT_WEIGHT = 1 << 18  # elements per expert matrix


def linear_groups(x: Tensor, weight: Tensor, counts: list[int], offs: Tensor | None) -> Tensor:
    """x (S, K) sorted by group @ weight[e].T, weight (E, N, K) -> (S, N); no autograd.

    With few rows per expert on CPU the result is computed transposed, (N, S), and returned as a
    (S, N) view with strides (1, S): callers must not assume it is contiguous.
    """
    active = sum(1 for c in counts if c)
    few_rows = x.shape[0] <= SMALL_ROWS_PER_EXPERT * max(active, 1)
    if x.device.type == "cpu" and few_rows and weight[0].numel() >= LARGE_EXPERT_WEIGHT and weight.is_contiguous():
        x = x.contiguous()
        out_t = x.new_empty(weight.shape[1], x.shape[0])  # (N, S)
        start = 0
        for e, c in enumerate(counts):
            if c:
                torch.mm(weight[e], x[start : start + c].t(), out=out_t[:, start : start + c])
                start += c
        return out_t.t()
    return mm_groups(x, weight.transpose(1, 2), counts, offs)


def weight_grad_groups(grad: Tensor, x: Tensor, counts: list[int], weight: Tensor, offs: Tensor | None = None) -> Tensor:
    """(E, N, K) gradient of `weight` for y = x @ weight[e].T per group: grad_e.T @ x_e.

    One grouped_mm over the shared row dimension where supported (experts without rows come
    out zero: an empty inner dimension); else written slice by slice into one uninitialised
    buffer, experts without rows zeroed.
    """
    if offs is not None and grad.dtype == weight.dtype and grouped_mm_supported(grad.t(), x):
        return F.grouped_mm(grad.t(), x, offs=offs)
    grad_w = torch.empty_like(weight)
    start = 0
    for e, c in enumerate(counts):
        if c:
            torch.mm(grad[start : start + c].t(), x[start : start + c], out=grad_w[e])
            start += c
        else:
            grad_w[e].zero_()
    return grad_w


class _GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, counts: list[int], offs: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.counts, ctx.offs = counts, offs
        # x (S, K), weight (E, N, K) -> (S, N); transposed view, no copy
        return linear_groups(x, weight, counts, offs)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        counts = ctx.counts
        grad = grad.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = mm_groups(grad, weight, counts, ctx.offs)  # (S, N) x (E, N, K) -> (S, K)
        if ctx.needs_input_grad[1]:
            grad_w = weight_grad_groups(grad, x, counts, weight, ctx.offs)
        return grad_x, grad_w, None, None


def grouped_linear(x: Tensor, weight: Tensor, counts: list[int], offs: Tensor | None = None) -> Tensor:
    """Rows of `x` (S, K) sorted by expert, `counts[e]` rows for expert e; weight (E, N, K) -> (S, N).

    offs: optional int32 cumulative counts on x's device (enables grouped_mm; pass it once per
    layer to avoid rebuilding it for every projection).
    """
    if len(counts) != weight.shape[0]:
        raise ValueError(f"{len(counts)} counts for {weight.shape[0]} experts")
    return _GroupedLinear.apply(x, weight, counts, offs)


class _GroupedLinearOffsets(torch.autograd.Function):
    """x (S, K) @ weight[e].T by grouped_mm on offsets, with the weight gradient in the weight's layout.

    grouped_mm's own autograd differentiates `weight.transpose(1, 2)` and hands back a transposed
    (E, N, K) gradient, which AccumulateGrad then copies into the parameter's layout (about a tenth
    of a compiled bfloat16 step on the CPU). Here it is grad_e.T @ x_e per group, (E, N, K) as the
    weight; groups without rows come out zero (an empty inner dimension).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, offs: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight, offs)
        return F.grouped_mm(x, weight.transpose(1, 2), offs=offs)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, offs = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = F.grouped_mm(grad, weight, offs=offs) if ctx.needs_input_grad[0] else None  # (S, K)
        grad_w = F.grouped_mm(grad.t(), x, offs=offs) if ctx.needs_input_grad[1] else None  # (E, N, K)
        return grad_x, grad_w, None


def grouped_linear_offsets(x: Tensor, weight: Tensor, offs: Tensor) -> Tensor:
    """Rows of `x` (S, K) sorted by expert @ weight[e].T, weight (E, N, K) -> (S, N), no Python counts.

    offs: int32 (E,) cumulative row counts on x's device (`sorted_offsets`). Rows at or after
    offs[-1] belong to no expert: their outputs (and the gradients `grouped_mm` gives them) are
    undefined, so a caller with such rows masks them. Traceable (no host synchronisation): traced,
    it needs `grouped_mm_compiles(x.dtype, x.device)` and rows whose byte strides are multiples of
    16 (K and N times the element size); in eager, where grouped_mm cannot run on these tensors, it
    reads the offsets on the host and takes `grouped_linear`'s loop (same result, a host sync).
    """
    if torch.compiler.is_compiling() or grouped_mm_supported(x, weight.transpose(1, 2)):
        return _GroupedLinearOffsets.apply(x, weight, offs)
    bounds = [0, *offs.tolist()]
    return grouped_linear(x, weight, [end - start for start, end in zip(bounds, bounds[1:])])


def sorted_offsets(sorted_expert: Tensor, num_experts: int) -> Tensor:
    """int32 (num_experts,) offsets of each expert's end in `sorted_expert` (S,) sorted ascending.

    A binary search per expert instead of `bincount(...).cumsum()`: static output shape, so it
    traces; values >= num_experts (a sentinel group sorted last) are counted in no offset.
    """
    bounds = torch.arange(1, num_experts + 1, device=sorted_expert.device, dtype=sorted_expert.dtype)
    return torch.searchsorted(sorted_expert, bounds, out_int32=True)


def make_offsets(counts: list[int], device: torch.device) -> Tensor:
    """int32 cumulative row counts, the `offs` argument of grouped_mm."""
    total, offs = 0, []
    for c in counts:
        total += c
        offs.append(total)
    return torch.tensor(offs, dtype=torch.int32, device=device)


def sort_pairs(indices: Tensor, dropped: Tensor | None, num_experts: int) -> tuple[Tensor, Tensor]:
    """The (token, slot) pairs of `indices` (T, k) grouped by expert: (sorted_expert, order), both (T*k,).

    Pair p is token p // k, slot p % k; order[i] is the pair at sorted position i. Pairs marked in
    `dropped` (T, k) go to a sentinel expert `num_experts` that sorts after every expert's pairs. The sort
    is stable: inside an expert the pairs keep token order.
    """
    pair_expert = indices.reshape(-1)
    if dropped is not None:
        pair_expert = pair_expert.masked_fill(dropped.reshape(-1), num_experts)
    return torch.sort(pair_expert, stable=True)


def inverse_permutation(order: Tensor) -> Tensor:
    """inverse[order[i]] = i: where each element of the permutation `order` (N,) went."""
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))


def is_silu(act: nn.Module) -> bool:
    # transformers' SiLUActivation is F.silu; recognised by name so layers/ need not import it
    return type(act).__name__ in ("SiLU", "SiLUActivation")


def run_sorted_experts(
    x_sorted: Tensor,
    offsets: Tensor,
    w_in: Tensor,
    w_down: Tensor,
    b_in: Tensor | None,
    b_down: Tensor | None,
    act: nn.Module,
    gated: bool,
    *,
    masked_tail: bool = False,
) -> Tensor:
    """The experts' FFN on rows already sorted by expert: (S, H) -> (S, H), unweighted, no host sync.

    offsets: int32 (E,) cumulative rows per expert (`sorted_offsets`); expert e owns rows
    offsets[e-1]:offsets[e]. w_in (E, N, H) with N = 2I [gate rows first] when `gated`, else I;
    w_down (E, H, I); b_in (E, N), b_down (E, H) or None. All in x_sorted's dtype.
    masked_tail: rows at or after offsets[-1] may exist (pairs dropped into a sentinel group sorted
    last); they are not computed, come out 0, and pass no gradient. Without it offsets[-1] must be S.
    Autograd through `grouped_linear_offsets`; traceable by `torch.compile` (no `.tolist()`), and the
    local expert computation for a caller that exchanges the rows itself (expert parallelism).
    """
    rows = x_sorted.shape[0]
    kept = None
    if masked_tail:
        # grouped_mm leaves the rows after offsets[-1] undefined, forward and backward; zero them on
        # the way in (their gradient to x), after the bias (the gradient to b_in) and on the way out
        kept = (torch.arange(rows, device=x_sorted.device) < offsets[-1])[:, None]  # (S, 1)
        x_sorted = torch.where(kept, x_sorted, 0)
    expert = None
    if b_in is not None or b_down is not None:
        row = torch.arange(rows, device=x_sorted.device, dtype=offsets.dtype)
        expert = torch.searchsorted(offsets, row, right=True).clamp_max(w_in.shape[0] - 1)  # (S,) row's expert
    h = grouped_linear_offsets(x_sorted, w_in, offsets)  # (S, N)
    if b_in is not None:
        h = h + b_in.index_select(0, expert)
    if kept is not None:
        h = torch.where(kept, h, 0)
    if gated:
        gate, up = h.chunk(2, dim=-1)
        a = (F.silu(gate) if is_silu(act) else act(gate)) * up
    else:
        a = act(h)
    y = grouped_linear_offsets(a, w_down, offsets)  # (S, H)
    if b_down is not None:
        y = y + b_down.index_select(0, expert)
    return y if kept is None else torch.where(kept, y, 0)


def combine_pairs(rows: Tensor, pair_w: Tensor | None, token: Tensor, inverse: Tensor | None,
                  shape: torch.Size) -> Tensor:
    """Sum the pair rows (S, H) sorted by expert, each scaled by its gate weight (S,) if given, into tokens (T, H).

    token: (S,) each row's token. inverse: (T*k,) the sorted position of pair t*k+s when no pair was
    dropped (`inverse_permutation`), else None.
    """
    if inverse is None:  # some pairs dropped: scatter-add
        rows = rows if pair_w is None else rows * pair_w[:, None]
        return rows.new_zeros(shape).index_add_(0, token, rows)
    # dropless: every token has exactly k pairs; gather them back in token order and reduce,
    # faster than index_add_ on CPU and deterministic everywhere
    rows = rows.index_select(0, inverse).view(shape[0], -1, shape[1])  # (T, k, H)
    if pair_w is None:
        return rows.sum(dim=1)
    # (T, 1, k) @ (T, k, H): the weighted sum in one pass
    return torch.bmm(pair_w.index_select(0, inverse).view(shape[0], 1, -1), rows).view(shape)

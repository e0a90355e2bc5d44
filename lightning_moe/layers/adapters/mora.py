"""MoRA: `MoRALinear`, a LoRA update read as self-activated rank-1 experts, grown per task, and its
adapter kind "mora" (it adds tasks: `MoRALinear.add_task`; only the newest task's ranks train;
per-token weights, so it cannot be merged).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .lora import _dropout
from .registry import AdapterKind, register_adapter_kind

__all__ = ["MoRAConfig", "MoRALinear"]


@dataclass
class MoRAConfig:
    r: int = 8  # rank-1 experts of the first task
    alpha: float = 16.0  # scaling = alpha / r (r of the first task)
    temperature: float = 1.0  # softmax temperature of the self-activation
    top_k: int | None = None  # activation budget (ranks kept per token); None = all
    threshold: float | None = None  # prune ranks whose normalised activation is below it
    dropout: float = 0.0  # on the adapter input


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
        # an oracle's selection: (B,) task index per sample; sample b's tokens self-activate only among
        # task forced_task[b]'s ranks, exactly as a layer holding only those ranks would (none if that task
        # has no ranks yet). None = among all ranks
        self.forced_task: Tensor | None = None
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

    def task_of_rank(self) -> Tensor:
        """(R,) the task whose block holds each rank."""
        sizes = [a.shape[0] for a in self.lora_A]
        return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)).to(self.lora_A[0].device)

    def rank_weights(self, z: Tensor, task: Tensor | None = None) -> Tensor:
        """w (..., R) from the rank activations z (..., R): normalise, softmax, budget, prune. `task` (a
        long tensor of z's leading shape): each token selects among its task's ranks only (the oracle)."""
        allowed = None if task is None else self.task_of_rank() == task.unsqueeze(-1)  # (..., R)
        # the oracle normalises over the task's own ranks: as if they were the layer's only ones
        norm_of = z if allowed is None else z * allowed
        s = z / norm_of.square().sum(dim=-1, keepdim=True).add(1e-12).sqrt()
        logits = s / self.temperature
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
        # a token whose task has no ranks yet: all -inf, softmax NaN; it activates nothing
        w = torch.softmax(logits, dim=-1).nan_to_num(0.0)
        keep = torch.ones_like(w, dtype=torch.bool) if allowed is None else allowed
        if self.top_k is not None and self.top_k < w.shape[-1]:
            top = w.topk(self.top_k, dim=-1).indices
            keep = torch.zeros_like(keep).scatter_(-1, top, True)
            if allowed is not None:  # top-k of a few allowed ranks may reach zero weights outside them
                keep = keep & allowed
        if self.threshold is not None:
            keep = keep & (s >= self.threshold)
        self.last_active_ranks = keep.sum(dim=-1).detach()
        return w * keep

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)
        a = torch.cat(list(self.lora_A)) if len(self.lora_A) > 1 else self.lora_A[0]  # (R, in)
        b = torch.cat(list(self.lora_B), dim=1) if len(self.lora_B) > 1 else self.lora_B[0]  # (out, R)
        z = F.linear(self.lora_dropout(x.to(a.dtype)), a)  # (..., R)
        w = self.rank_weights(z, self.token_tasks(z.shape[:-1]))
        return out + (F.linear(w * z, b) * self.scaling).to(out.dtype)

    def token_tasks(self, shape: torch.Size) -> Tensor | None:
        """`forced_task` (B,) spread over a (B, ...) token shape; None without an oracle."""
        if self.forced_task is None:
            return None
        forced = self.forced_task.to(self.lora_A[0].device)
        if forced.dim() != 1 or len(shape) < 1 or forced.shape[0] != shape[0]:
            raise ValueError(f"forced_task of shape {tuple(forced.shape)} for tokens of shape {tuple(shape)}: "
                             "one task index per sample is needed")
        return forced.view(-1, *([1] * (len(shape) - 1))).expand(shape)

    def extra_repr(self) -> str:
        ranks = [a.shape[0] for a in self.lora_A]
        return f"ranks per task={ranks}, temperature={self.temperature}, top_k={self.top_k}, threshold={self.threshold}"


def _newest_task(layer: MoRALinear) -> Iterator[tuple[str, nn.Parameter]]:
    # earlier tasks' ranks stay frozen, bit-identical (continual learning)
    t = len(layer.lora_A) - 1
    yield f"lora_A.{t}", layer.lora_A[t]
    yield f"lora_B.{t}", layer.lora_B[t]


register_adapter_kind(AdapterKind(name="mora", config=MoRAConfig, layer=MoRALinear, target="linear",
                                  wrapped="base_layer", trainable=_newest_task, add_task=MoRALinear.add_task))

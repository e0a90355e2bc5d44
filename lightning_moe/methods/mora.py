"""MoRA: continual instruction tuning with self-activated sparse rank-1 experts (METHODS.md, MoRA).

Every chosen projection (attention and MLP by default) gets a `MoRALinear`: a LoRA update read as
rank-1 experts, each token weighting them by its own normalised activations (no router):

    z_i = A_i x,  s = z / ||z||,  w = softmax(s / temperature),  keep the top_k largest w and those
    with s_i >= threshold,   out = base(x) + alpha / r * sum_i w_i B_i z_i

Task 0 trains the first `lora.r` ranks; before each later task `add_mora_task` appends
`ranks_per_task` new ranks to every MoRA layer and freezes all earlier ones (they get no gradient
and stay bit-identical), and the fresh optimizer of the new task sees only the new ranks. The
task loop, the accuracy matrix and its scores are `ContinualMethod`'s; where the adapters go
(`lora.targets`, `lora.layers`) and the freeze plan are `LoRATuning`'s.

Besides the LM loss, the method logs the average number of active ranks per real token
(`train/active_ranks`, `val/active_ranks`), which the activation budget and pruning bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torchmetrics import MeanMetric

from ..layers import MoRALinear
from ..models import AdapterConfig, add_mora_task
from .base import StepOutput
from .continual import ContinualMethod


@dataclass
class MoRAOptions:
    """Self-activation and growth of the rank-1 experts (the paper publishes no values: README, MoRA)."""

    temperature: float = 0.5  # softmax temperature over the normalised activations s (each in [-1, 1])
    top_k: int | None = 8  # activation budget: ranks kept per token; None = all
    threshold: float | None = None  # pruning: drop ranks with s_i below it; None = no pruning
    ranks_per_task: int | None = None  # ranks added before each later task; None = lora.r


class MoRAContinual(ContinualMethod):
    def __init__(self, mora: MoRAOptions | None = None, **kwargs: Any):
        """
        Args:
            mora: temperature, activation budget (top_k), pruning threshold, ranks added per task.
            **kwargs: ContinualMethod's (`lora`: r = ranks of task 0, alpha, dropout, targets,
                layers) and MultimodalMethod's (backbone, optimizer, ...).
        """
        self.mora = mora or MoRAOptions()
        super().__init__(**kwargs)
        self.ranks_per_task = self.mora.ranks_per_task or self.lora.r
        self.mora_layers = [m for m in self.model.modules() if isinstance(m, MoRALinear)]
        self.active_ranks = torch.nn.ModuleDict({"val": MeanMetric(), "test": MeanMetric()})  # training logs per step

    def adapter_rules(self) -> list[AdapterConfig]:
        o, m = self.lora, self.mora
        return [AdapterConfig(kind="mora", targets=list(o.targets), layers=o.layers, r=o.r, alpha=o.alpha,
                              dropout=o.dropout, temperature=m.temperature, top_k=m.top_k, threshold=m.threshold)]

    def start_task(self, task: int) -> None:
        # task 0 trains the ranks the surgery made; each later task adds its own (earlier ones freeze)
        while len(self.mora_layers[0].lora_A) < task + 1:
            add_mora_task(self.model, self.ranks_per_task)

    def mean_active_ranks(self, token_mask: torch.Tensor) -> torch.Tensor:
        """Active ranks per real token, averaged over tokens and MoRA layers, of the last forward pass."""
        mask = token_mask.bool()  # (B, T')
        per_layer = [layer.last_active_ranks[mask].float().mean() for layer in self.mora_layers]
        return torch.stack(per_layer).mean()

    def compute_loss(self, batch: dict[str, Any]) -> StepOutput:
        step = super().compute_loss(batch)
        step.logs["active_ranks"] = self.mean_active_ranks(step.token_mask)
        self._forward_active_ranks = step.logs["active_ranks"]
        return step

    def _eval_step(self, batch: dict[str, Any], stage: str) -> dict[str, Any]:
        out = super()._eval_step(batch, stage)
        # the teacher-forced pass's ranks (generation ran after it and overwrote last_active_ranks)
        self.active_ranks[stage].update(self._forward_active_ranks, weight=out["token_mask"].sum())
        return out

    def _log_eval_epoch(self, stage: str) -> None:
        super()._log_eval_epoch(stage)
        if self.active_ranks[stage].update_count:
            self.log(f"{stage}/active_ranks", self.active_ranks[stage].compute())
        self.active_ranks[stage].reset()

    def adapter_parameter_counts(self) -> dict[str, int]:
        counts = super().adapter_parameter_counts()
        counts["ranks"] = self.mora_layers[0].r  # ranks per layer now (all tasks)
        return counts

"""MoRA: continual instruction tuning with self-activated sparse rank-1 experts (docs/mora.md).

Every chosen projection (attention and MLP by default) gets a `MoRALinear`: a LoRA update read as
rank-1 experts, each token weighting them by its own normalised activations (no router):

    z_i = A_i x,  s = z / ||z||,  w = softmax(s / temperature),  keep the top_k largest w and those
    with s_i >= threshold,   out = base(x) + alpha / r * sum_i w_i B_i z_i

Task 0 trains the first `lora.r` ranks; before each later task `add_adapter_task` appends
`ranks_per_task` new ranks to every MoRA layer (the adapter kind's task) and freezes all earlier ones
(they get no gradient and stay bit-identical), and the fresh optimizer of the new task sees only the
new ranks. The task loop, the accuracy matrix and its scores are the `TaskLoop`'s (continual.py),
which the method holds; where the adapters go (`lora.targets`, `lora.layers`) and the freeze plan
are `LoRATuning`'s.

Besides the LM loss, the method logs the average number of active ranks per real token
(`train/active_ranks`, `val/active_ranks`), which the activation budget and pruning bound, and
keeps `rank_usage`: for each evaluated task, how many of a token's active ranks belong to each
training task's block (the last evaluation). It shows whether old tasks' tokens still select their
own ranks or the newest ones (the mechanism behind forgetting, or its absence). `mora.task_oracle`
selects perfectly instead (each task's inputs activate only its own ranks): what forgetting remains
then is interference, not selection failure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from ..layers import MoRALinear
from ..models import AdapterRule, add_adapter_task
from ..safe_load import checkpoint_safe
from .base import StepOutput
from .continual import Continual, TaskLoop, continual_lora
from .lora import LoRAOptions, LoRATuning


@checkpoint_safe
@dataclass
class MoRAOptions:
    """Self-activation and growth of the rank-1 experts (the paper publishes no values: docs/mora.md)."""

    temperature: float = 0.1  # softmax temperature over the normalised activations s (each in [-1, 1])
    top_k: int | None = 8  # activation budget: ranks kept per token; None = all
    threshold: float | None = 0.3  # pruning: drop ranks with s_i below it; None = no pruning
    ranks_per_task: int | None = None  # ranks added before each later task; None = lora.r
    # scaling alpha / lora.r of the rank-1 experts; None = lora.alpha. Apart from lora.alpha so that the
    # LoRA baselines, which share the `lora` options, keep theirs (docs/mora.md: why MoRA needs more)
    alpha: float | None = None
    # the task oracle, for experiments (experiments/continual.py): each sample's tokens self-activate only
    # among its own task's ranks (task id = the batch's domain), i.e. perfect rank selection
    task_oracle: bool = False


class MoRAContinual(Continual, LoRATuning):
    changes_trainable_parameters = True  # each task adds its ranks and freezes the earlier ones

    def __init__(self, mora: MoRAOptions | None = None, lora: LoRAOptions | None = None, **kwargs: Any):
        """
        Args:
            mora: temperature, activation budget (top_k), pruning threshold, ranks added per task,
                the experts' scale alpha (default lora.alpha).
            lora: r = ranks of task 0, alpha, dropout, target projections and layers (default
                `continual_lora()`: r=8 on every attention and MLP projection).
            **kwargs: LoRATuning's and MultimodalMethod's (backbone, optimizer, ...); the task
                sequence comes from the data module.
        """
        self.mora = mora or MoRAOptions()
        super().__init__(lora=lora or continual_lora(), **kwargs)
        self.task_loop = TaskLoop(self)
        self.ranks_per_task = self.mora.ranks_per_task or self.lora.r
        self.mora_layers = [m for m in self.model.modules() if isinstance(m, MoRALinear)]
        self.active_ranks = torch.nn.ModuleDict({"val": MeanMetric(), "test": MeanMetric()})  # training logs per step
        self.rank_usage: dict[str, torch.Tensor] = {}  # evaluated task -> (tasks trained,) active ranks per block
        self._usage: dict[str, list[torch.Tensor]] = {}  # this pass: task -> [(sum per block, tokens)]
        self._record_inputs = False
        for layer in self.mora_layers:  # evaluation only: the layer input, to attribute active ranks to tasks
            layer.register_forward_hook(self._remember_input)

    def _remember_input(self, layer: MoRALinear, args: tuple, output: torch.Tensor) -> None:
        if self._record_inputs:
            layer.recorded_input = args[0].detach()

    def adapter_rules(self) -> list[AdapterRule]:
        o, m = self.lora, self.mora
        alpha = o.alpha if m.alpha is None else m.alpha
        return [AdapterRule(kind="mora", targets=list(o.targets), layers=o.layers, r=o.r, alpha=alpha,
                            dropout=o.dropout, temperature=m.temperature, top_k=m.top_k, threshold=m.threshold)]

    # ------------------------------------------------------------------ the task hooks (TaskLoop)
    def start_task(self, task: int) -> None:
        # task 0 trains the ranks the surgery made; each later task adds its own (earlier ones freeze)
        while len(self.mora_layers[0].lora_A) < task + 1:
            add_adapter_task(self.model, self.ranks_per_task)

    def restore_task(self, task: int, state: dict[str, Any]) -> None:
        # resuming in task `task`: its ranks and every earlier task's must exist (frozen) before the
        # checkpoint's state dict loads; the ranks' values come from the checkpoint
        self.start_task(task)

    def mean_active_ranks(self, token_mask: torch.Tensor) -> torch.Tensor:
        """Active ranks per real token, averaged over tokens and MoRA layers, of the last forward pass."""
        mask = token_mask.bool()  # (B, T')
        per_layer = [layer.last_active_ranks[mask].float().mean() for layer in self.mora_layers]
        return torch.stack(per_layer).mean()

    def select_task_ranks(self, batch: dict[str, Any]) -> None:
        """With `mora.task_oracle`: tell every MoRA layer each sample's task (from the batch's domains)."""
        if not self.mora.task_oracle:
            return
        tasks = self.task_loop.task_names
        unknown = sorted(set(batch["domain"]) - set(tasks))
        if unknown:
            raise ValueError(f"MoRA task oracle: domains {unknown} of the batch are not tasks of the sequence "
                             f"{tasks}")
        forced = torch.tensor([tasks.index(d) for d in batch["domain"]], device=self.device)
        for layer in self.mora_layers:
            layer.forced_task = forced

    def compute_loss(self, batch: dict[str, Any]) -> StepOutput:
        self.select_task_ranks(batch)  # evaluation's generation, which follows, keeps the batch's tasks
        step = super().compute_loss(batch)
        step.logs["active_ranks"] = self.mean_active_ranks(step.token_mask)
        if self._record_inputs:  # evaluation: attribute the active ranks to the tasks that trained them
            step.extras["rank_usage"] = self.rank_usage_sum(step.token_mask)
            self._record_inputs = False  # generation, which follows, runs the layers again
        return step

    @torch.no_grad()
    def rank_usage_sum(self, token_mask: torch.Tensor) -> torch.Tensor:
        """(tasks,) active ranks of each task's block, summed over real tokens, averaged over layers,
        of the last recorded forward pass."""
        mask = token_mask.bool()  # (B, T')
        per_layer = []
        for layer in self.mora_layers:
            a = torch.cat(list(layer.lora_A))  # (R, in)
            kept_count = layer.last_active_ranks
            tasks = layer.token_tasks(mask.shape)
            keep = layer.rank_weights(F.linear(layer.recorded_input[mask].to(a.dtype), a),
                                      None if tasks is None else tasks[mask]) > 0  # (tokens, R)
            layer.last_active_ranks = kept_count  # rank_weights overwrote it with this subset's
            layer.recorded_input = None  # (B, T', d) per layer: not kept alive into the next task
            sizes = [t.shape[0] for t in layer.lora_A]
            per_layer.append(torch.stack([block.sum() for block in keep.split(sizes, dim=-1)]).float())
        return torch.stack(per_layer).mean(0)

    def on_eval_batch_start(self, batch: dict[str, Any], stage: str) -> None:
        super().on_eval_batch_start(batch, stage)  # the task loop's (Continual)
        self._record_inputs = True  # the teacher-forced pass's layer inputs, for `rank_usage_sum`

    def on_eval_batch(self, step: StepOutput, batch: dict[str, Any], stage: str) -> None:
        super().on_eval_batch(step, batch, stage)
        self._record_inputs = False
        # the teacher-forced pass's ranks (generation ran after it and overwrote last_active_ranks)
        tokens = step.token_mask.sum()
        self.active_ranks[stage].update(step.logs["active_ranks"], weight=tokens)
        if stage == "val":
            self._usage.setdefault(batch["domain"][0], []).append((step.extras["rank_usage"], tokens))

    def eval_epoch_metrics(self, stage: str) -> dict[str, torch.Tensor]:
        values = super().eval_epoch_metrics(stage)  # with the task loop's (Continual)
        if stage == "val" and self._usage:
            self.rank_usage = {task: sum(u for u, _ in parts) / sum(n for _, n in parts).clamp(min=1)
                               for task, parts in self._usage.items()}
            self._usage = {}
        if self.active_ranks[stage].update_count:
            values[f"{stage}/active_ranks"] = self.active_ranks[stage].compute()
        self.active_ranks[stage].reset()
        return values

    def adapter_parameter_counts(self) -> dict[str, int]:
        counts = super().adapter_parameter_counts()
        counts["ranks"] = self.mora_layers[0].r  # ranks per layer now (all tasks)
        return counts

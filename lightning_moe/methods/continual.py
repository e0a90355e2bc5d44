"""`ContinualMethod`: the task loop of continual instruction tuning, inside one `trainer.fit`.

Protocol (METHODS.md, MoRA; MTIL-style), with `ContinualDataModule`:

    epoch i = task i:   on_train_epoch_start -> start_task(i) (a method adds/resets adapters),
                        fresh optimizer (new parameters, no momentum carried from the last task)
                        train `steps_per_task` batches of task i
                        validate on EVERY task's test split -> row i of acc[i, j]

The accuracy on task j is the exact match of greedy answers (the base method's per-domain
metric; a task is a domain). Row i goes into an `AccuracyMatrix` torchmetric, and Last / Avg /
Transfer / BWT / forgetting of the rows so far are logged after every task (`continual/...`);
`callbacks.AccuracyMatrixImage` draws the matrix in TensorBoard.

A subclass says what happens at a task boundary (`start_task`) and, if needed, around the
evaluation of one task (`use_task_for_eval`, for methods that are given the task id).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..metrics import AccuracyMatrix
from .base import MultimodalMethod


class ContinualMethod(MultimodalMethod):
    def __init__(self, **kwargs: Any):
        """Args: MultimodalMethod's (backbone, optimizer, ...); the task sequence comes from the data module."""
        super().__init__(**kwargs)
        self.task_names: list[str] = []
        self.current_task = -1  # no task started yet
        self.accuracy: AccuracyMatrix | None = None

    # ------------------------------------------------------------------ what subclasses say
    def start_task(self, task: int) -> None:
        """Called once before task `task` trains (task 0 included): add / reset / freeze adapters."""

    def use_task_for_eval(self, task: int) -> None:
        """Called before each evaluation batch of task `task` (a method given the task id selects it)."""

    def end_eval(self) -> None:
        """Called after an evaluation pass, to undo what `use_task_for_eval` changed."""

    def adapter_parameter_counts(self) -> dict[str, int]:
        """`total`: adapter parameters the method holds at the end; `per_task`: trained on each task."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"total": trainable, "per_task": trainable}

    # ------------------------------------------------------------------ the task loop
    def _continual_data(self):
        data = self.trainer.datamodule
        if data is None or not hasattr(data, "task_names"):
            raise ValueError(f"{type(self).__name__} needs a ContinualDataModule (a task sequence), got {type(data).__name__}")
        return data

    def on_fit_start(self) -> None:
        data = self._continual_data()
        data.check_trainer(self.trainer)
        self.task_names = list(data.task_names)
        self.accuracy = AccuracyMatrix(len(self.task_names)).to(self.device)

    def on_train_epoch_start(self) -> None:
        task = self.trainer.current_epoch
        if task == self.current_task:
            return
        self.current_task = task
        self.start_task(task)
        if task > 0:
            # the parameter set (or its values) changed: a fresh optimizer, as at the start of a task.
            self.trainer.strategy.setup_optimizers(self.trainer)

    # ------------------------------------------------------------------ evaluation of every task
    def _eval_step(self, batch: dict[str, Any], stage: str) -> dict[str, Any]:
        if self.task_names:
            tasks = set(batch["domain"])
            if len(tasks) != 1:
                raise ValueError(f"an evaluation batch mixes tasks {sorted(tasks)}; expected one loader per task")
            self.use_task_for_eval(self.task_names.index(tasks.pop()))
        return super()._eval_step(batch, stage)

    def _task_row(self, stage: str) -> torch.Tensor | None:
        """Exact match per task from this pass's metrics (before the base logs and resets them)."""
        row = []
        for name in self.task_names:
            metrics = self.eval_metrics[f"{stage}/{name}"] if f"{stage}/{name}" in self.eval_metrics else None
            if metrics is None or metrics["exact_match"].total == 0:
                return None  # not every task was evaluated (e.g. generation off); no row
            row.append(metrics["exact_match"].compute())
        return torch.stack(row)

    def on_validation_epoch_end(self) -> None:
        self.end_eval()
        fitting = self.trainer.state.fn == "fit" and not self.trainer.sanity_checking
        row = self._task_row("val") if fitting and self.accuracy is not None else None
        super().on_validation_epoch_end()
        if row is None:
            return
        self.accuracy.update(self.current_task, row)
        values = {f"continual/acc/{name}": v for name, v in zip(self.task_names, row)}
        values.update({f"continual/{k}": v for k, v in self.accuracy.compute().items() if not math.isnan(v.item())})
        self.log_dict(values)

    def on_test_epoch_end(self) -> None:
        self.end_eval()
        super().on_test_epoch_end()

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

Adapters and the freeze plan are `LoRATuning`'s (`lora`: rank, alpha, targets, layers; only
the `adapters` group trains, the base model, connector and vision tower stay frozen). A subclass
says what happens at a task boundary (`start_task`) and, if needed, around the evaluation of one
task (`use_task_for_eval`, for methods that are given the task id). `ContinualLoRA` holds the
plain-LoRA baselines of the MoRA experiment (sequential, joint, task-specific); `MoRAContinual`
(`mora.py`) swaps the LoRA rule for MoRA's.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..metrics import AccuracyMatrix
from .lora import LoRAOptions, LoRATuning


def small_lora() -> LoRAOptions:
    """The continual experiment's default: rank 8 on attention and MLP projections, no dropout
    (tiny models, short tasks; the MoLE reference's r=32 / dropout 0.05 is for 7B models)."""
    return LoRAOptions(r=8, alpha=16.0, dropout=0.0)


class ContinualMethod(LoRATuning):
    def __init__(self, lora: LoRAOptions | None = None, **kwargs: Any):
        """
        Args:
            lora: rank, alpha, dropout, target projections and layers of the adapters (default
                `small_lora()`: r=8 on every attention and MLP projection).
            **kwargs: LoRATuning's and MultimodalMethod's (backbone, optimizer, ...); the task
                sequence comes from the data module.
        """
        super().__init__(lora=lora or small_lora(), **kwargs)
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

    def adapter_names(self) -> list[str]:
        """Names of the adapter parameters (trainable or frozen by a finished task)."""
        return [n for n, _ in self.model.named_parameters() if ".lora_" in n]

    def adapter_parameter_counts(self) -> dict[str, int]:
        """`total`: adapter parameters the method holds now; `per_task`: those trained on one task."""
        total = sum(self.model.get_parameter(n).numel() for n in self.adapter_names())
        return {"total": total, "per_task": sum(p.numel() for p in self.parameters() if p.requires_grad)}

    # ------------------------------------------------------------------ the task loop
    def _continual_data(self):
        data = self.trainer.datamodule
        if data is None or not hasattr(data, "task_names"):
            raise ValueError(f"{type(self).__name__} needs a ContinualDataModule (a task sequence), "
                             f"got {type(data).__name__}")
        return data

    def on_fit_start(self) -> None:
        data = self._continual_data()
        data.check_trainer(self.trainer)
        self.task_names, self.current_task = list(data.task_names), -1
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


# --------------------------------------------------------------------------- plain-LoRA baselines
LORA_STRATEGIES = ("sequential", "joint", "task_specific")


class ContinualLoRA(ContinualMethod):
    """Plain-LoRA baselines over the same task sequence and steps as MoRA.

    - `sequential`: one LoRA keeps training task after task (forgetting expected).
    - `joint`: one LoRA trained on the mixture of all tasks (the data module's `schedule: joint`),
      the multi-task upper bound; its rows show the same model after each epoch of the mixture.
    - `task_specific`: a fresh LoRA per task, and evaluation on task j uses task j's LoRA (the task
      id is given: an oracle no continual method has). Tasks not trained yet are evaluated with the
      fresh LoRA (B = 0, i.e. the base model).
    """

    def __init__(self, strategy: str = "sequential", **kwargs: Any):
        """strategy: sequential | joint | task_specific (class docstring). **kwargs: ContinualMethod's."""
        if strategy not in LORA_STRATEGIES:
            raise ValueError(f"strategy must be one of {LORA_STRATEGIES}, got {strategy!r}")
        self.strategy = strategy
        super().__init__(**kwargs)
        self._bank: dict[int, dict[str, torch.Tensor]] = {}  # task -> its trained LoRA (task_specific)
        self._live: dict[str, torch.Tensor] | None = None  # the weights in training, kept during evaluation

    def on_fit_start(self) -> None:
        super().on_fit_start()
        schedule = getattr(self.trainer.datamodule, "schedule", None)
        if (self.strategy == "joint") != (schedule == "joint"):
            raise ValueError(f"strategy {self.strategy!r} needs the data module's schedule "
                             f"{'joint' if self.strategy == 'joint' else 'sequential'}, got {schedule!r}")
        self._bank = {}
        # every task's LoRA starts from the same initialisation (also what untrained tasks are evaluated with)
        self._initial = self._adapter_state()

    def _adapter_state(self) -> dict[str, torch.Tensor]:
        return {n: self.model.get_parameter(n).detach().clone() for n in self.adapter_names()}

    @torch.no_grad()
    def _load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        for name, value in state.items():
            self.model.get_parameter(name).copy_(value)

    def start_task(self, task: int) -> None:
        if self.strategy != "task_specific" or task == 0:
            return
        self._bank[task - 1] = self._adapter_state()
        self._load_adapter_state(self._initial)

    def use_task_for_eval(self, task: int) -> None:
        if self.strategy != "task_specific":
            return
        if self._live is None:
            self._live = self._adapter_state()
        if task in self._bank:
            self._load_adapter_state(self._bank[task])
        elif task > self.current_task:
            self._load_adapter_state(self._initial)
        else:  # the task in training
            self._load_adapter_state(self._live)

    def end_eval(self) -> None:
        if self._live is not None:
            self._load_adapter_state(self._live)
            self._live = None

    def adapter_parameter_counts(self) -> dict[str, int]:
        counts = super().adapter_parameter_counts()
        if self.strategy == "task_specific":  # one LoRA per task is kept
            counts["total"] = counts["per_task"] * max(len(self.task_names), 1)
        return counts

"""Continual instruction tuning: `TaskLoop`, the task loop a continual method holds, and
`ContinualLoRA`, the plain-LoRA baselines that run it (`MoRAContinual` in mora.py is the other).

Protocol (MTIL-style, docs/mora.md), with `ContinualDataModule`, inside one `trainer.fit`:

    epoch i = task i:   on_train_epoch_start -> start_task(i) (the method adds/resets adapters),
                        fresh optimizer (new parameters, no momentum carried from the last task)
                        train `steps_per_task` batches of task i
                        validate on EVERY task's test split -> row i of acc[i, j]

The accuracy on task j is the exact match of greedy answers (the base method's per-domain
metric; a task is a domain). Row i goes into an `AccuracyMatrix` torchmetric, and Last / Avg /
Transfer / BWT / forgetting of the rows so far are logged after every task (`continual/...`);
`callbacks.AccuracyMatrixImage` draws the matrix in TensorBoard.

Resuming (`main.py fit ... --ckpt_path X`, Lightning's own resume path): the method's
`on_save_checkpoint` stores the loop's state under `checkpoint["continual"]` (task names, the task
in training, the accuracy matrix so far, the seed every task's random states derive from, and what
the method keeps outside the state dict, its `task_state`); its `on_load_checkpoint`, which
Lightning calls before it loads the state dict, checks the task sequence against the data module's
and rebuilds the module as it was in that task (`restore_task`: MoRA adds the later tasks' ranks
and freezes the earlier ones), so the state dict and the task's optimizer state load onto the same
parameters. A checkpoint written at the end of a task (the shipped config's `ModelCheckpoint`)
continues exactly as the uninterrupted run would, under `max_steps` too, and so does one written in the
middle of a task: after a step, or at the end of an epoch that `max_steps` cut short (`resume_after_epoch_end`
rewrites Lightning's loop state of an epoch-end checkpoint so). One written after the last step of a task but
before its evaluation is refused with an error saying which checkpoints resume it.

A continual method is a `LoRATuning` (`lora`: where the adapters go and their size; only the
`adapters` group trains) with the `Continual` mixin listed before it: it holds a `TaskLoop(self)`,
fills the task hooks the loop calls (`start_task`; if needed `restore_task` / `task_state` for
resuming and `use_task_for_eval` / `end_eval` around the evaluation of one task, for methods given
the task id), and the mixin's Lightning hooks run the loop.
"""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import torch
from lightning.pytorch.strategies import DDPStrategy, Strategy
from torch.nn.parallel import DistributedDataParallel

from ..metrics import AccuracyMatrix
from ..models import canonical_log
from ..formats import CHECKPOINT_CONFIG_KEY
from .lora import LoRAOptions, LoRATuning

CONTINUAL_CHECKPOINT_KEY = "continual"  # the task loop's state in a Lightning checkpoint


def continual_lora() -> LoRAOptions:
    """The continual methods' default adapters: rank 8 on every attention and MLP projection, no dropout
    (tiny models, short tasks; the MoLE reference's r=32 / dropout 0.05 is for 7B models)."""
    return LoRAOptions(r=8, alpha=16.0, dropout=0.0)


def seed_task(sequence_seed: int, task: int) -> None:
    """Seed the global generators (torch on every device, numpy, random) for task `task` of a sequence."""
    seed = (sequence_seed + task) % 2**32
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def wrapped_by_ddp(strategy: Strategy) -> bool:
    """Whether Lightning's `strategy` trains through a `DistributedDataParallel` wrapper it built (DDP, not DeepSpeed)."""
    return isinstance(strategy, DDPStrategy) and isinstance(strategy.model, DistributedDataParallel)


def written_after_an_epochs_last_batch(fit_loop: dict[str, Any]) -> bool:
    """Whether Lightning's fit-loop state `fit_loop` (a checkpoint's `loops.fit_loop`) was saved right after the
    last batch of an epoch (`on_train_batch_end`, e.g. by `every_n_train_steps`), before the epoch's evaluation
    and its `on_train_epoch_end`: Lightning resumes such a checkpoint in the next epoch and runs neither."""
    epochs, batches = fit_loop["epoch_progress"]["total"], fit_loop["epoch_loop.batch_progress"]
    return (epochs["processed"] < epochs["started"] and batches["is_last_batch"]
            and batches["total"]["completed"] < batches["total"]["processed"])


def resume_after_epoch_end(fit_loop: dict[str, Any]) -> None:
    """Rewrite Lightning's fit-loop state of a checkpoint saved at an epoch's end (`on_train_epoch_end`, or after
    the fit) as the state saved after the epoch's last trained batch, whose resume Lightning gets right.

    Lightning counts an epoch as processed before `on_train_epoch_end`, also when `trainer.max_steps` (or
    `should_stop`) ended it before its last batch. Resumed from such a state, Lightning calls the rest of epoch e
    "epoch e + 1" or, under `max_steps` (whose resume always restarts the loop), replays the end of epoch e and
    counts it twice: the run then stops at `max_epochs` one epoch early. With one epoch per task, that starts
    task e + 1 before task e is finished, or drops the last task. As saved after its last trained batch, epoch e
    continues at the next batch (the loader's state says which) when it was cut short, or the next epoch starts
    from its first batch when it was complete (its evaluation and `on_train_epoch_end` already ran, and are not
    run again; Lightning then calls no `on_train_epoch_start` for that epoch, so the task loop also starts a task
    at its first batch). Called from `on_load_checkpoint`, before Lightning restores its loops from the dict.
    """
    epochs, batches = fit_loop["epoch_progress"], fit_loop["epoch_loop.batch_progress"]
    if epochs["total"]["processed"] < epochs["total"]["started"]:
        return  # saved during the epoch
    for counts in (epochs["total"], epochs["current"]):
        counts["processed"] = counts["completed"] = counts["started"] - 1
    if batches["is_last_batch"]:  # complete: as saved in `on_train_batch_end` of its last batch
        for counts in (batches["total"], batches["current"]):
            counts["completed"] = counts["processed"] - 1
        fit_loop["epoch_loop.state_dict"]["_batches_that_stepped"] -= 1  # counted after `on_train_batch_end`


class TaskLoop:
    """The task loop of one continual method (module docstring): the task sequence, the task in training,
    the accuracy matrix, and the loop's state in checkpoints.

    The method's Lightning hooks call it (`Continual`'s): `fit_start` (on_fit_start), `train_epoch_start`
    (on_train_epoch_start and on_train_batch_start), `eval_batch_start` (on_eval_batch_start),
    `eval_epoch_metrics` (merged into its own), `save` / `load` (on_save_checkpoint / on_load_checkpoint, after
    the base's). It calls the method's task hooks, what happens around a task (`Continual`'s docstring).
    """

    def __init__(self, method: Continual):
        self.method = method
        self.task_names: list[str] = []
        self.current_task = -1  # no task started yet
        self.accuracy: AccuracyMatrix | None = None
        self.sequence_seed: int | None = None  # task i starts from the random states seeded by sequence_seed + i
        self._resume: dict[str, Any] | None = None  # the checkpoint's task-loop state, until fit starts

    # ------------------------------------------------------------------ the task loop
    def _continual_data(self):
        data = self.method.trainer.datamodule
        if data is None or not hasattr(data, "task_names"):
            raise ValueError(f"{type(self.method).__name__} needs a ContinualDataModule (a task sequence), "
                             f"got {type(data).__name__}")
        return data

    def fit_start(self) -> None:
        data = self._continual_data()
        data.check_trainer(self.method.trainer)
        self._check_strategy()
        resume, self._resume = self._resume, None
        if resume is not None:
            self._check_task_sequence(resume["tasks"], list(data.task_names))
        self.task_names = list(data.task_names)
        self.accuracy = AccuracyMatrix(len(self.task_names)).to(self.method.device)
        if resume is None:
            # drawn from the run's seed (seed_everything), kept in checkpoints
            self.current_task, self.sequence_seed = -1, int(torch.randint(0, 2**31, ()).item())
            self.method.start_sequence()
            return
        # resuming: the rows so far, the task in training (its ranks and optimizer are restored by
        # Lightning), and the seed the next tasks start from
        self.current_task, self.sequence_seed = resume["current_task"], resume["sequence_seed"]
        if resume["accuracy"] is not None:
            self.accuracy.acc.copy_(resume["accuracy"])

    def _check_strategy(self) -> None:
        """A method whose trainable parameters change between tasks runs in one process or under DDP, whose wrapper
        `train_epoch_start` rebuilds; other multi-process strategies keep what they set up at the start of the fit."""
        strategy = self.method.trainer.strategy
        if self.method.changes_trainable_parameters and self.method.trainer.world_size > 1 and not wrapped_by_ddp(strategy):
            raise ValueError(
                f"{type(self.method).__name__} changes its trainable parameters at each task, which "
                f"{type(strategy).__name__} does not follow after it set the model up (the new parameters would "
                "train on each process apart): run it in one process or with trainer.strategy=ddp")

    def train_epoch_start(self) -> None:
        """Start task `trainer.current_epoch` if it is not the task in training (the task loop also calls this at
        every training batch: Lightning resuming into a new epoch calls no `on_train_epoch_start`)."""
        trainer = self.method.trainer
        task = trainer.current_epoch
        if task == self.current_task:
            return
        self.current_task = task
        # every task starts from random states that depend only on the sequence's seed and the task,
        # so a run resumed from a checkpoint draws the same new ranks as the uninterrupted run
        # (Lightning itself draws from the global generator a different number of times on restart)
        seed_task(self.sequence_seed, task)
        self.method.start_task(task)
        if task > 0:
            strategy = trainer.strategy
            if wrapped_by_ddp(strategy):
                # DDP averages the gradients of the parameters that trained when it wrapped the model: a task that
                # adds or unfreezes parameters (MoRA's new ranks) needs a new wrapper, or each rank trains its own
                strategy.model = strategy.lightning_module
                strategy.configure_ddp()
            # the parameter set (or its values) changed: a fresh optimizer, as at the start of a task.
            strategy.setup_optimizers(trainer)

    # ------------------------------------------------------------------ checkpoints: resume a sequence
    def save(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CONTINUAL_CHECKPOINT_KEY] = {
            "tasks": list(self.task_names),
            "current_task": self.current_task,
            "accuracy": None if self.accuracy is None else self.accuracy.acc.detach().cpu().clone(),
            "sequence_seed": self.sequence_seed,
            "method": self.method.task_state(),
        }

    def load(self, checkpoint: dict[str, Any]) -> None:
        name = type(self.method).__name__
        state = checkpoint.get(CONTINUAL_CHECKPOINT_KEY)
        if state is None:
            raise ValueError(f"{name}: the checkpoint{self._ckpt_name()} has no '{CONTINUAL_CHECKPOINT_KEY}' "
                             "state: it was not written by a continual method, so the task loop cannot resume from it")
        trainer = self.method._trainer
        data = trainer.datamodule if trainer is not None else None
        if data is not None and hasattr(data, "task_names"):
            self._check_task_sequence(state["tasks"], list(data.task_names))
        fit_loop = checkpoint.get("loops", {}).get("fit_loop")  # none: not a training checkpoint, no loop restored
        if fit_loop and written_after_an_epochs_last_batch(fit_loop):
            task = state["current_task"]
            raise ValueError(
                f"{name}: the checkpoint{self._ckpt_name()} was written after the last step of task {task} "
                f"({state['tasks'][task]}, global step {checkpoint.get('global_step')}), before the task's "
                f"evaluation: Lightning would resume it in task {task + 1} without evaluating task {task} (its row "
                f"of the accuracy matrix) or running the end of its epoch; resume from the checkpoint written at the "
                f"end of task {task} (after its evaluation: the continual config's task{task}.ckpt) or from one "
                "written after an earlier step")
        self.method.restore_task(max(state["current_task"], 0), state["method"])
        surgery = self.method.model.surgery
        saved = checkpoint.get(CHECKPOINT_CONFIG_KEY, {}).get("surgery")
        if saved is not None and canonical_log(saved) != canonical_log(surgery):
            raise ValueError(f"{name}: the checkpoint{self._ckpt_name()}'s model went through the surgery "
                             f"{saved}, but this configuration rebuilds {surgery} for task "
                             f"{state['current_task']}; resume with the configuration it was trained with")
        self.task_names, self.current_task = list(state["tasks"]), state["current_task"]
        self._resume = state
        if fit_loop:
            resume_after_epoch_end(fit_loop)

    def _ckpt_name(self) -> str:
        trainer = self.method._trainer
        path = getattr(trainer, "ckpt_path", None) if trainer is not None else None
        return f" {path}" if path else ""

    def _check_task_sequence(self, saved: list[str], current: list[str]) -> None:
        if saved != current:
            raise ValueError(f"the checkpoint{self._ckpt_name()} was written for the task sequence {saved}, but the "
                             f"data module's is {current}; resume with the same tasks in the same order")

    # ------------------------------------------------------------------ evaluation of every task
    def eval_batch_start(self, batch: dict[str, Any]) -> None:
        if self.task_names:
            tasks = set(batch["domain"])
            if len(tasks) != 1:
                raise ValueError(f"an evaluation batch mixes tasks {sorted(tasks)}; expected one loader per task")
            self.method.use_task_for_eval(self.task_names.index(tasks.pop()))

    def task_row(self, stage: str) -> torch.Tensor | None:
        """Exact match per task from this pass's metrics (before the base logs and resets them)."""
        row = []
        for name in self.task_names:
            key = f"{stage}/{name}"
            metrics = self.method.eval_metrics[key] if key in self.method.eval_metrics else None
            if metrics is None or metrics["exact_match"].total == 0:
                return None  # not every task was evaluated (e.g. generation off); no row
            row.append(metrics["exact_match"].compute())
        return torch.stack(row)

    def eval_epoch_metrics(self, stage: str) -> dict[str, torch.Tensor]:
        """After an evaluation pass: `end_eval`, then, after each task of a fit, the accuracy matrix's row
        and the scores of the rows so far (not in the sanity check, validate or test)."""
        self.method.end_eval()
        trainer = self.method.trainer
        fitting = stage == "val" and trainer.state.fn == "fit" and not trainer.sanity_checking
        row = self.task_row(stage) if fitting and self.accuracy is not None else None
        if row is None:
            return {}
        self.accuracy.update(self.current_task, row)
        values = {f"continual/acc/{name}": v for name, v in zip(self.task_names, row)}
        values.update({f"continual/{k}": v for k, v in self.accuracy.compute().items() if not math.isnan(v.item())})
        return values


class Continual:
    """The mixin of a continual method, listed before its `LoRATuning` (`class M(Continual, LoRATuning)`),
    which holds a `TaskLoop(self)` as `task_loop`: its Lightning hooks run the loop, and the task hooks
    below are what the loop calls (`start_task` the method fills; the others do nothing by default).
    """

    task_loop: TaskLoop
    changes_trainable_parameters = False  # whether `start_task` adds or (un)freezes parameters (multi-process: DDP only)

    # ------------------------------------------------------------------ the task hooks (TaskLoop calls them)
    def start_task(self, task: int) -> None:
        """Once before task `task` trains (task 0 included): add / reset / freeze adapters."""
        raise NotImplementedError(f"{type(self).__name__} must say what happens before a task (start_task)")

    def restore_task(self, task: int, state: dict[str, Any]) -> None:
        """Resuming in task `task`: rebuild the module as it was while that task trained, before the
        checkpoint's state dict loads (same parameters, same ones frozen); `state` is what `task_state` returned."""

    def task_state(self) -> dict[str, Any]:
        """What the method keeps outside its state dict and needs to resume."""
        return {}

    def start_sequence(self) -> None:
        """A fit starts the sequence from its beginning (not on resume)."""

    def use_task_for_eval(self, task: int) -> None:
        """Before each evaluation batch of task `task` (a method given the task id selects it)."""

    def end_eval(self) -> None:
        """After an evaluation pass: undo what `use_task_for_eval` changed."""

    # ------------------------------------------------------------------ Lightning hooks: the task loop
    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.task_loop.fit_start()

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self.task_loop.train_epoch_start()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        self.task_loop.train_epoch_start()

    def on_eval_batch_start(self, batch: dict[str, Any], stage: str) -> None:
        super().on_eval_batch_start(batch, stage)
        self.task_loop.eval_batch_start(batch)

    def eval_epoch_metrics(self, stage: str) -> dict[str, torch.Tensor]:
        return {**super().eval_epoch_metrics(stage), **self.task_loop.eval_epoch_metrics(stage)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        self.task_loop.save(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.task_loop.load(checkpoint)


# --------------------------------------------------------------------------- plain-LoRA baselines
LORA_STRATEGIES = ("sequential", "joint", "task_specific")


class ContinualLoRA(Continual, LoRATuning):
    """Plain-LoRA baselines over the same task sequence and steps as MoRA.

    - `sequential`: one LoRA keeps training task after task (forgetting expected).
    - `joint`: one LoRA trained on the mixture of all tasks (the data module's `schedule: joint`),
      the multi-task upper bound; its rows show the same model after each epoch of the mixture.
    - `task_specific`: a fresh LoRA per task, and evaluation on task j uses task j's LoRA (the task
      id is given: an oracle no continual method has). Tasks not trained yet are evaluated with the
      fresh LoRA (B = 0, i.e. the base model).
    """

    def __init__(self, strategy: str = "sequential", lora: LoRAOptions | None = None, **kwargs: Any):
        """
        Args:
            strategy: sequential | joint | task_specific (class docstring).
            lora: rank, alpha, dropout, target projections and layers of the LoRA (default
                `continual_lora()`: r=8 on every attention and MLP projection).
            **kwargs: LoRATuning's and MultimodalMethod's (backbone, optimizer, ...); the task
                sequence comes from the data module.
        """
        if strategy not in LORA_STRATEGIES:
            raise ValueError(f"strategy must be one of {LORA_STRATEGIES}, got {strategy!r}")
        self.strategy = strategy
        super().__init__(lora=lora or continual_lora(), **kwargs)
        self._bank: dict[int, dict[str, torch.Tensor]] = {}  # task -> its trained LoRA (task_specific)
        self._live: dict[str, torch.Tensor] | None = None  # the weights in training, kept during evaluation
        self.task_loop = TaskLoop(self)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        schedule = getattr(self.trainer.datamodule, "schedule", None)
        if (self.strategy == "joint") != (schedule == "joint"):
            raise ValueError(f"strategy {self.strategy!r} needs the data module's schedule "
                             f"{'joint' if self.strategy == 'joint' else 'sequential'}, got {schedule!r}")

    # ------------------------------------------------------------------ the task hooks (TaskLoop)
    def start_sequence(self) -> None:
        self._bank = {}
        # every task's LoRA starts from the same initialisation (also what untrained tasks are evaluated with)
        self._initial = self._adapter_state()

    def task_state(self) -> dict[str, Any]:
        # the earlier tasks' LoRAs and the initialisation live outside the state dict (task_specific)
        return {"bank": self._bank, "initial": getattr(self, "_initial", None)}

    def restore_task(self, task: int, state: dict[str, Any]) -> None:
        self._bank = {int(t): dict(weights) for t, weights in state.get("bank", {}).items()}
        if state.get("initial") is not None:
            self._initial = state["initial"]

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
        elif task > self.task_loop.current_task:
            self._load_adapter_state(self._initial)
        else:  # the task in training
            self._load_adapter_state(self._live)

    def end_eval(self) -> None:
        if self._live is not None:
            self._load_adapter_state(self._live)
            self._live = None

    def adapter_parameter_counts(self) -> dict[str, int]:
        counts = super().adapter_parameter_counts()
        if self.strategy == "task_specific":  # one LoRA per task is kept (what trains beside it is not an adapter)
            counts["total"] = counts["total"] * max(len(self.task_loop.task_names), 1)
        return counts

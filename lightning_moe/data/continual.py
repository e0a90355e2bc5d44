"""`ContinualDataModule`: an ordered sequence of LLaVA-format tasks for continual instruction tuning.

The protocol (MTIL-style, as MoRA is evaluated): the model trains on task 0, then task 1, ..., and
after each task it is evaluated on EVERY task's test split, which fills row i of the accuracy
matrix `acc[i, j]` (accuracy on task j after training task i).

Inside one `trainer.fit`, epoch i is task i: the train loader of epoch i draws `steps_per_task`
batches from task i only (`schedule: sequential`) or from the mixture of all tasks (`schedule:
joint`, the multi-task upper bound with the same number of steps), and the validation loaders are
every task's test split, one loader per task in task order, so Lightning's `dataloader_idx` j is
task j. That needs the trainer to run one epoch per task and rebuild the train loader every epoch
(`max_epochs` = number of tasks, `reload_dataloaders_every_n_epochs: 1`); `check_trainer` says so
clearly when a config forgets it.

Reading, tokenization, collate and sampling are `DomainMixtureDataModule`'s: a task is a domain
whose evaluation split is its test file. Choosing a setting (the steps per task) on the test split the
results report would leak it, so `evaluate_on: val` fills the matrix from each task's val file instead,
for the runs a setting is chosen on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch.utils.data import ConcatDataset, DataLoader

from lightning_moe.data.datamodule import DomainMixtureDataModule, DomainSpec, discover_domains
from lightning_moe.paths import resolve_data_path

SCHEDULES = ("sequential", "joint")


@dataclass
class TaskSpec:
    """One task: its name (the `domain` every sample carries) and train / test (/ val) file(s) under `root`."""

    name: str
    train: str | list[str]
    test: str | list[str]
    val: str | list[str] | None = None  # needed only by `evaluate_on: val`


class ContinualDataModule(DomainMixtureDataModule):
    """A task sequence (see the module docstring).

    Each epoch's loader is new and draws with the same `seed` (as before resumable loaders), so a task's
    batches do not depend on its position in the sequence.

    Args:
        tasks: the tasks in training order. None: the domains found under `root` (each
            `<domain>/{train,test}.jsonl`), in `order` if given, else in name order.
        order: domain names of `root` in training order (used when `tasks` is None); a subset
            is allowed, so a config can pick which shipped domains form the sequence.
        steps_per_task: training batches drawn per task (with replacement), i.e. per epoch.
        schedule: `sequential` (epoch i trains task i) or `joint` (every epoch draws from all tasks).
        evaluate_on: `test` (the results) or `val` (for choosing a setting: each task's val file fills the
            matrix, so that the test split stays unseen).
        **kwargs: `DomainMixtureDataModule`'s arguments (root, tokenizer, batch_size, ...);
            `max_eval_samples_per_domain` caps each task's test split.
    """

    reseed_sampler_every_epoch = False

    def __init__(
        self,
        tasks: list[TaskSpec] | None = None,
        order: list[str] | None = None,
        steps_per_task: int = 100,
        schedule: str = "sequential",
        root: str = "data/shapes",
        evaluate_on: str = "test",
        **kwargs: Any,
    ):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if evaluate_on not in ("test", "val"):
            raise ValueError(f"evaluate_on must be 'test' or 'val', got {evaluate_on!r}")
        if steps_per_task <= 0:
            raise ValueError(f"steps_per_task must be positive, got {steps_per_task}")
        if tasks is None:
            tasks = default_tasks(root, order)
        elif order is not None:
            raise ValueError("give either `tasks` (explicit files) or `order` (shipped domain names), not both")
        # Python callers may pass plain dicts; the CLI passes TaskSpec instances.
        self.tasks = [t if isinstance(t, TaskSpec) else TaskSpec(**t) for t in tasks]
        names = [t.name for t in self.tasks]
        if not names:
            raise ValueError("the task sequence is empty")
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        if evaluate_on == "val" and (missing := [t.name for t in self.tasks if not t.val]):
            raise ValueError(f"evaluate_on: val needs a val file for every task; none for {missing} under {root}")
        # both evaluation splits hold the files the matrix is filled from
        evaluated = {t.name: t.val if evaluate_on == "val" else t.test for t in self.tasks}
        domains = {t.name: DomainSpec(train=t.train, val=evaluated[t.name], test=evaluated[t.name]) for t in self.tasks}
        kwargs.pop("samples_per_epoch", None)  # set from steps_per_task below
        super().__init__(domains=domains, root=root, **kwargs)
        self.steps_per_task, self.schedule = steps_per_task, schedule
        # after the base saved its hyperparameters (under the CLI they are the given config, so set here)
        self.hparams.update(tasks=[t.name for t in self.tasks], order=order, steps_per_task=steps_per_task,
                            schedule=schedule, evaluate_on=evaluate_on,
                            samples_per_epoch=steps_per_task * self.hparams.batch_size)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def current_task(self) -> int:
        """Index of the task being trained: the trainer's epoch (0 before a trainer is attached)."""
        trainer = getattr(self, "trainer", None)
        return 0 if trainer is None else min(trainer.current_epoch, self.num_tasks - 1)

    def check_trainer(self, trainer) -> None:
        """One epoch per task, and a fresh train loader each epoch; raise naming the setting otherwise."""
        if trainer.max_epochs != self.num_tasks:
            raise ValueError(
                f"continual training runs one epoch per task: set trainer.max_epochs to {self.num_tasks} "
                f"(the number of tasks {self.task_names}), got {trainer.max_epochs}"
            )
        if trainer.reload_dataloaders_every_n_epochs != 1:
            raise ValueError("continual training needs trainer.reload_dataloaders_every_n_epochs: 1 "
                             "(each epoch trains on the next task's data)")

    def train_dataloader(self) -> DataLoader:
        """`steps_per_task` batches of the current task (sequential) or of all tasks (joint)."""
        train = self.datasets["train"]
        chosen = list(train.values()) if self.schedule == "joint" else [train[self.task_names[self.current_task]]]
        dataset = ConcatDataset(chosen)
        return self._loader(dataset, self.hparams.batch_size, self.train_sampler(dataset))

    def task_test_dataloaders(self) -> dict[str, DataLoader]:
        """Every task's test loader by name (needs `setup("test")` or `setup("fit")`)."""
        split = "test" if "test" in self.datasets else "val"  # both hold the evaluated files
        return {name: self._loader(d, self.hparams.eval_batch_size) for name, d in self.datasets[split].items()}


def default_tasks(root: str, order: list[str] | None = None) -> list[TaskSpec]:
    """The domains under `root` that have train and test files, in `order` (or name order)."""
    found = discover_domains(resolve_data_path(root))
    usable = {name: spec for name, spec in found.items() if spec.train and spec.test}
    if order is None:
        order = list(usable)
    unknown = [name for name in order if name not in usable]
    if unknown:
        raise ValueError(f"tasks {unknown} not found under {root} with train and test files; available: {sorted(usable)}")
    if len(set(order)) != len(order):
        raise ValueError(f"task order names a task twice: {order}")
    return [TaskSpec(name, usable[name].train, usable[name].test, usable[name].val) for name in order]

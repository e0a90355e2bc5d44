"""The training progress bar: optimizer steps done out of `max_steps` on a step-based run.

Lightning's bars count batches per epoch, and a run that sets only `max_steps` has `max_epochs = -1`,
so the bar restarts at every pass over the data under the title "Epoch N/-2" and says nothing about
how far the run is. `StepProgressBar` is Lightning's `TQDMProgressBar` with one change on such runs:
one bar over the whole run, `global_step / max_steps`, with tqdm's elapsed and remaining time. An
epoch-based run, validation (one bar per domain loader), test and predict keep Lightning's bars.
`LightningMoECLI` makes it the default bar (a config that names its own bar keeps it).
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


def counts_steps(trainer: L.Trainer) -> bool:
    """True when the run ends at `max_steps` rather than after a number of epochs."""
    return trainer.max_steps > 0 and trainer.max_epochs in (None, -1)


class StepProgressBar(TQDMProgressBar):
    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if counts_steps(self.trainer) else super().total_train_batches

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if not counts_steps(trainer):
            return super().on_train_epoch_start(trainer, *args)
        bar = self.train_progress_bar
        if bar.total != trainer.max_steps:  # the first epoch of this fit: later epochs continue the same bar
            bar.reset(total=trainer.max_steps)
            # a resumed run starts at its checkpoint's step; rate and time left count this run's steps only
            bar.initial = bar.n = trainer.global_step
            bar.set_description("Training steps")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not counts_steps(trainer):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar, step = self.train_progress_bar, trainer.global_step  # optimizer steps (gradient accumulation aware)
        if bar is not None and not bar.disable and self._should_update(step, bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # also refreshes the bar

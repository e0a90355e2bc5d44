"""TensorBoard view of continual learning: the accuracy matrix acc[i, j] as an image (task names and
values, drawn by `lightning_moe.plots`) and as a table.

Reads the `AccuracyMatrix` that a continual method's `task_loop` (methods/continual.py) fills after
each task's evaluation once the validation pass is over, so the row just written is included. Rows of tasks
not trained yet are left blank. The scalars (`continual/acc/<task>`, `continual/last`, ...) are
logged by the method itself.
"""

from __future__ import annotations

import lightning as L

from .. import plots
from ..metrics import accuracy_table
from .routing import _tensorboard, log_figure


class AccuracyMatrixImage(L.Callback):
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loop = getattr(pl_module, "task_loop", None)
        accuracy = None if loop is None else loop.accuracy
        writer = _tensorboard(trainer)
        if writer is None or accuracy is None or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        rows = accuracy.filled_rows
        if rows == 0:
            return
        matrix = accuracy.matrix().cpu()  # (rows, T): the rows of the tasks trained so far
        step = rows - 1  # the task just trained
        log_figure(writer, "continual/accuracy_matrix", plots.accuracy_matrix(matrix, loop.task_names), step)
        writer.add_text("continual/accuracy_matrix_table", accuracy_table(matrix, loop.task_names), step)

"""TensorBoard view of continual learning: the accuracy matrix acc[i, j] as an image and a table.

Reads `pl_module.accuracy` (an `AccuracyMatrix` that `ContinualMethod` fills after each task's
evaluation) once the validation pass is over, so the row just written is included. Rows of tasks
not trained yet are drawn dark (0). The scalars (`continual/acc/<task>`, `continual/last`, ...) are
logged by the method itself.
"""

from __future__ import annotations

import lightning as L
import torch

from ..metrics import accuracy_table
from .routing import _tensorboard, heatmap_image


class AccuracyMatrixImage(L.Callback):
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        accuracy = getattr(pl_module, "accuracy", None)
        writer = _tensorboard(trainer)
        if writer is None or accuracy is None or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        rows = accuracy.filled_rows
        if rows == 0:
            return
        full = torch.zeros(accuracy.num_tasks, accuracy.num_tasks)  # (T, T), untrained rows dark
        full[:rows] = accuracy.matrix().cpu()
        step = rows - 1  # the task just trained
        writer.add_image("continual/accuracy_matrix", heatmap_image(full, cell=24), step)
        writer.add_text("continual/accuracy_matrix_table", accuracy_table(full[:rows], pl_module.task_names), step)

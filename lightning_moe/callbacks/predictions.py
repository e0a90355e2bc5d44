"""`PredictionWriter`: what `main.py predict` generates, written as JSON lines.

The method's `predict_step` returns one dict per sample (id, domain, prediction, answer), made by
generation with the KV cache as the method's `generation` settings say (greedy by default, or
seeded sampling; with `ExpertOffloading`, experts read from a store); this writer appends them to `<output_dir>/predictions.jsonl`
batch by batch, so a long prediction run keeps what it has done if it stops.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info


class PredictionWriter(BasePredictionWriter):
    def __init__(self, output_dir: str = "runs/predictions", filename: str = "predictions.jsonl"):
        """output_dir: where the file goes; filename: the JSON-lines file (one record per sample)."""
        super().__init__(write_interval="batch")
        self.base_path = Path(output_dir) / filename
        self.path = self.base_path  # per rank when several processes predict

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.base_path.parent.mkdir(parents=True, exist_ok=True)
        suffix = "" if trainer.world_size == 1 else f".rank{trainer.global_rank}"
        self.path = self.base_path.with_name(self.base_path.name + suffix)
        self.path.write_text("")  # a fresh file per run
        self.written = 0

    def write_on_batch_end(self, trainer, pl_module, prediction: Any, batch_indices, batch, batch_idx: int,
                           dataloader_idx: int = 0) -> None:
        with self.path.open("a") as f:
            for record in prediction:
                f.write(json.dumps(record) + "\n")
        self.written += len(prediction)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rank_zero_info(f"wrote {self.written} predictions to {self.path}")

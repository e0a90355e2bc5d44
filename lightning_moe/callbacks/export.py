"""Stage hand-off: write the trained model (and its tokenizer) as a `save_pretrained` directory
that the next stage's `backbone.pretrained` names; or only its adapters (`save_adapters`: a small
safetensors file + the adapter surgery as JSON) that a method's `adapters_path` loads back."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from ..models import save_adapters


class SavePretrained(L.Callback):
    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.model.save_pretrained(self.dirpath)
        pl_module.tokenizer.save_pretrained(self.dirpath)
        rank_zero_info(f"saved the trained model to {self.dirpath}")


class SaveAdapters(L.Callback):
    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        save_adapters(pl_module.model, self.dirpath)
        rank_zero_info(f"saved the trained adapters to {self.dirpath}")

"""Stage hand-off: write the trained model (and its tokenizer) as a `save_pretrained` directory
that the next stage's `backbone.pretrained` names; or only its adapters (`save_adapters`: a small
safetensors file + the adapter surgery as JSON) that a method's `adapters_path` loads back.
`SavePretrained(merged_dirpath=...)` also writes a copy with the mergeable adapters (LoRA, LoRA on
experts) folded into the weights: a plain (sparse) model that expert offloading and export read."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from ..models import merge_lora, save_adapters


class SavePretrained(L.Callback):
    def __init__(self, dirpath: str, merged_dirpath: str | None = None):
        """dirpath: the model as trained (adapters apart); merged_dirpath: also a copy with the adapters merged."""
        self.dirpath = Path(dirpath)
        self.merged_dirpath = Path(merged_dirpath) if merged_dirpath else None

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.model.save_pretrained(self.dirpath)
        pl_module.tokenizer.save_pretrained(self.dirpath)
        rank_zero_info(f"saved the trained model to {self.dirpath}")
        if self.merged_dirpath is not None:
            merged = copy.deepcopy(pl_module.model)
            merge_lora(merged)
            merged.save_pretrained(self.merged_dirpath)
            pl_module.tokenizer.save_pretrained(self.merged_dirpath)
            rank_zero_info(f"saved the model with its adapters merged to {self.merged_dirpath}")


class SaveAdapters(L.Callback):
    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        save_adapters(pl_module.model, self.dirpath)
        rank_zero_info(f"saved the trained adapters to {self.dirpath}")

"""`LightningMoECLI`: the LightningCLI every command runs through.

Any LightningModule / LightningDataModule can be named with `--model` / `--data` (subclass
mode), so a researcher's own method subclass runs with the same configs. Configs are parsed in
omegaconf mode (interpolation such as `${model.init_args.tokenizer}` works) and merge in order
when `--config` is given several times. The default progress bar counts optimizer steps to
`max_steps` (`callbacks.StepProgressBar`).
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI

from .callbacks import StepProgressBar


class LightningMoECLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("parser_kwargs", {"parser_mode": "omegaconf"})
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(L.LightningModule, L.LightningDataModule, *args,
                         subclass_mode_model=True, subclass_mode_data=True, **kwargs)

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        """Lightning's trainer, with `StepProgressBar` in place of the bar Lightning adds by default
        (kept: a bar the config names; none: `enable_progress_bar: false`)."""
        # looked at before the trainer exists: Lightning appends its default bar to this same list
        configured = self._get(self.config_init, "trainer", default={}).get("callbacks") or []
        own_bar = any(isinstance(c, ProgressBar) for c in configured)
        trainer = super().instantiate_trainer(**kwargs)
        default = trainer.progress_bar_callback
        if default is not None and not own_bar:
            trainer.callbacks[trainer.callbacks.index(default)] = StepProgressBar()
        return trainer


def main(args: list[str] | None = None) -> LightningMoECLI:
    return LightningMoECLI(args=args)

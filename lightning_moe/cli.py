"""`LightningMoECLI`: the LightningCLI every command runs through.

Any LightningModule / LightningDataModule can be named with `--model` / `--data` (subclass
mode), so a researcher's own method subclass runs with the same configs. Configs are parsed in
omegaconf mode (interpolation such as `${model.init_args.tokenizer}` works) and merge in order
when `--config` is given several times.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import LightningCLI


class LightningMoECLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("parser_kwargs", {"parser_mode": "omegaconf"})
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(L.LightningModule, L.LightningDataModule, *args,
                         subclass_mode_model=True, subclass_mode_data=True, **kwargs)


def main(args: list[str] | None = None) -> LightningMoECLI:
    return LightningMoECLI(args=args)

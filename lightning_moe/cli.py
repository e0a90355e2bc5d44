"""`LightningMoECLI`: the LightningCLI every command runs through.

Any LightningModule / LightningDataModule can be named with `--model` / `--data` (subclass
mode), so a researcher's own method subclass runs with the same configs. Configs are parsed in
omegaconf mode (interpolation such as `${trainer.max_steps}` works) and merge in order
when `--config` is given several times. The data module's tokenizer is the model's too (linked), so
a config names it once.
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

    def add_arguments_to_parser(self, parser) -> None:
        # token ids must mean the same on both sides; the model keeps it in its hyperparameters, so a
        # checkpoint still loads without the data module
        parser.link_arguments("data.init_args.tokenizer", "model.init_args.tokenizer")


def main(args: list[str] | None = None) -> LightningMoECLI:
    return LightningMoECLI(args=args)

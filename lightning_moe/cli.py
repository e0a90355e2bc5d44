"""`LightningMoECLI`: the LightningCLI every command runs through.

Any LightningModule / LightningDataModule can be named with `--model` / `--data` (subclass
mode), so a researcher's own method subclass runs with the same configs. Configs are parsed in
omegaconf mode (interpolation such as `${trainer.max_steps}` works) and merge in order
when `--config` is given several times. The data module's tokenizer is the model's too (linked), so
a config names it once. `effective_config` reads what a config means once its includes
(configs/_base/) and defaults are applied, for code that derives one config from another.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from lightning.pytorch.cli import LightningCLI


class LightningMoECLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("parser_kwargs", {"parser_mode": "omegaconf"})
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(L.LightningModule, L.LightningDataModule, *args,
                         subclass_mode_model=True, subclass_mode_data=True, **kwargs)

    def instantiate_classes(self) -> None:
        # validate/test/predict --ckpt_path: the method rebuilds its model from the checkpoint's own record, so
        # neither the stage directories nor the teacher it was trained from are needed (methods/from_checkpoint.py)
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand in ("validate", "test", "predict") else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return super().instantiate_classes()
        from .methods.from_checkpoint import rebuilding_from

        with rebuilding_from(ckpt_path):
            super().instantiate_classes()

    def add_arguments_to_parser(self, parser) -> None:
        # token ids must mean the same on both sides; the model keeps it in its hyperparameters, so a
        # checkpoint still loads without the data module
        parser.link_arguments("data.init_args.tokenizer", "model.init_args.tokenizer")


def main(args: list[str] | None = None) -> LightningMoECLI:
    return LightningMoECLI(args=args)


def effective_config(*configs: str | Path, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """What `main.py fit --config A [--config B ...] [overrides] --print_config` prints, as a dict: the
    shipped configs include parts of configs/_base/, so their files alone are not the whole run."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main(["fit", *(a for c in configs for a in ("--config", str(c))), *overrides, "--print_config"])
        except SystemExit as exit_:  # --print_config exits after printing
            if exit_.code not in (0, None):
                raise
    return yaml.safe_load(out.getvalue())

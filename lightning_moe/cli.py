"""`LightningMoECLI`: the LightningCLI every command runs through.

Any LightningModule / LightningDataModule can be named with `--model` / `--data` (subclass
mode), so a researcher's own method subclass runs with the same configs. Configs are parsed in
omegaconf mode (interpolation such as `${trainer.max_steps}` works) and merge in order
when `--config` is given several times. The data module's tokenizer is the model's too (linked), so
a config names it once. The default progress bar counts optimizer steps to `max_steps`
(`callbacks.StepProgressBar`). `effective_config` reads what a config means once its includes
(configs/_base/) and defaults are applied, for code that derives one config from another.
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI

from .callbacks import StepProgressBar


def help_for_named_model(argv: list[str]) -> list[str]:
    """`fit --model pkg.MyMethod --model.help` lists MyMethod's options (jsonargparse alone would show the
    base LightningModule's: its `--model.help` takes the class as its own value)."""
    argv = list(argv)
    if "--model.help" not in argv:
        return argv
    at = argv.index("--model.help")
    if at + 1 < len(argv) and not argv[at + 1].startswith("-"):
        return argv  # the class is given to --model.help itself
    named = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--model"]
    named += [a.split("=", 1)[1] for a in argv if a.startswith("--model=")]
    if named:
        argv.insert(at + 1, named[-1])
    return argv


class LightningMoECLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        if isinstance(kwargs.get("args"), list) or kwargs.get("args") is None:
            kwargs["args"] = help_for_named_model(sys.argv[1:] if kwargs.get("args") is None else kwargs["args"])
        kwargs.setdefault("parser_kwargs", {"parser_mode": "omegaconf"})
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(L.LightningModule, L.LightningDataModule, *args,
                         subclass_mode_model=True, subclass_mode_data=True, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        # token ids must mean the same on both sides; the model keeps it in its hyperparameters, so a
        # checkpoint still loads without the data module
        parser.link_arguments("data.init_args.tokenizer", "model.init_args.tokenizer")

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

"""`LightningMoECLI`: the LightningCLI every command runs through.

Any LightningModule / LightningDataModule can be named with `--model` / `--data` (subclass
mode), so a researcher's own method subclass runs with the same configs. Configs are parsed in
omegaconf mode (interpolation such as `${model.init_args.tokenizer}` works) and merge in order
when `--config` is given several times.

Every run also gets (`add_run_safety`): a `NonFiniteGuard` (a NaN/inf loss or gradient stops the
run before it reaches the weights or a checkpoint) and `AtomicCheckpointIO` (a checkpoint is
written beside its target and renamed over it). The config is saved into the logger's directory,
never into the working directory when there is no logger (`LogDirSaveConfig`). `main` turns the
errors a user can fix (a missing path, a damaged checkpoint, a config typo) into one message
naming the path or key; `--debug` (or `LIGHTNING_MOE_DEBUG=1`) shows the full traceback instead.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import lightning as L
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from lightning_moe.callbacks.checkpoint_io import AtomicCheckpointIO
from lightning_moe.callbacks.guards import NonFiniteError, NonFiniteGuard
from lightning_moe.errors import explain


class LogDirSaveConfig(SaveConfigCallback):
    """Lightning's config saving, skipped when the run has no logger.

    Without a logger `trainer.log_dir` is the working directory, where Lightning would silently
    overwrite any `config.yaml` the user keeps there."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.logger is None:
            if not self.already_saved:
                rank_zero_info("no logger: the resolved config is not saved (print it with --print_config)")
            self.already_saved = True
            return
        super().setup(trainer, pl_module, stage)


def add_run_safety(config: dict[str, Any]) -> dict[str, Any]:
    """Trainer arguments with the run-safety defaults: a `NonFiniteGuard` unless one is configured,
    `AtomicCheckpointIO` unless a CheckpointIO plugin is given."""
    callbacks = config.get("callbacks") or []
    callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
    if not any(isinstance(c, NonFiniteGuard) for c in callbacks):
        callbacks.append(NonFiniteGuard())
    config["callbacks"] = callbacks
    plugins = config.get("plugins") or []
    plugins = list(plugins) if isinstance(plugins, list) else [plugins]
    strategy = config.get("strategy")
    # sharded strategies (FSDP, DeepSpeed, ModelParallel) write their checkpoints with their own IO
    name = (strategy if isinstance(strategy, str) else type(strategy).__name__).lower().replace("_", "")
    sharded = any(s in name for s in ("fsdp", "deepspeed", "modelparallel"))
    if not sharded and not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    config["plugins"] = plugins or None
    return config


class LightningMoECLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        # exit_on_error=False: a parse error is raised to `main`, which prints its one line without the usage dump
        kwargs.setdefault("parser_kwargs", {"parser_mode": "omegaconf", "exit_on_error": False})
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("save_config_callback", LogDirSaveConfig)
        super().__init__(L.LightningModule, L.LightningDataModule, *args,
                         subclass_mode_model=True, subclass_mode_data=True, **kwargs)

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        extra_callbacks = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
        trainer_config = add_run_safety({**self._get(self.config_init, "trainer", default={}), **kwargs})
        return self._instantiate_trainer(trainer_config, extra_callbacks)


# ----------------------------------------------------------------------------- clear errors
DEBUG_FLAG = "--debug"


def main(args: list[str] | None = None) -> LightningMoECLI:
    """Run the CLI; a user-fixable error prints one message and exits with status 1 (`--debug`: traceback)."""
    debug = os.environ.get("LIGHTNING_MOE_DEBUG", "") not in ("", "0")
    if args is None:  # the command line: LightningCLI reads sys.argv itself (and warns if given both)
        debug |= DEBUG_FLAG in sys.argv
        sys.argv = [a for a in sys.argv if a != DEBUG_FLAG]
    else:
        debug |= DEBUG_FLAG in args
        args = [a for a in args if a != DEBUG_FLAG]
    if debug:
        return LightningMoECLI(args=args)
    try:
        return LightningMoECLI(args=args)
    except (Exception, SystemExit) as error:
        message = explain(error)
        if message is None:
            raise
        print(f"error: {message}\n(run again with {DEBUG_FLAG} for the full traceback)", file=sys.stderr)
        raise SystemExit(1) from None


__all__ = ["LightningMoECLI", "LogDirSaveConfig", "NonFiniteError", "add_run_safety", "main"]

"""`LightningMoECLI`: the LightningCLI every command runs through.

Any LightningModule / LightningDataModule can be named with `--model` / `--data` (subclass
mode), so a researcher's own method subclass runs with the same configs. Configs are parsed in
omegaconf mode (interpolation such as `${trainer.max_steps}` works) and merge in order
when `--config` is given several times. The data module's tokenizer is the model's too (linked), so
a config names it once. The default progress bar counts optimizer steps to `max_steps`
(`callbacks.StepProgressBar`). `effective_config` reads what a config means once its includes
(configs/_base/) and defaults are applied, for code that derives one config from another.

`--ckpt_path` (`_parse_ckpt_path`): Lightning applies the checkpoint's hyperparameters over the command's
model settings. Here the file is read by `safe_load.load_torch_file` (a pickle payload is refused naming
the global it holds), a checkpoint of another method class, stage or model plan (surgery and trainable set,
`PLAN_SETTINGS`) than the config's stops the run (`check_same_method`), and the loading opt-ins are never
taken from it (`safe_load.without_loading_opt_ins`).

Every run also gets (`add_run_safety`): a `NonFiniteGuard` (a NaN/inf loss or gradient stops the
run before it reaches the weights or a checkpoint) and `AtomicCheckpointIO` (a checkpoint is
written beside its target and renamed over it). The config is saved into the logger's directory,
never into the working directory when there is no logger (`LogDirSaveConfig`). `main` turns the
errors a user can fix (a missing path, a damaged checkpoint, a config typo) into one message
naming the path or key; `--debug` (or `LIGHTNING_MOE_DEBUG=1`) shows the full traceback instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from jsonargparse import Namespace
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from lightning_moe.callbacks import StepProgressBar
from lightning_moe.callbacks.checkpoint_io import AtomicCheckpointIO
from lightning_moe.callbacks.guards import NonFiniteError, NonFiniteGuard
from lightning_moe.errors import CheckpointMismatchError, explain
from lightning_moe.safe_load import load_torch_file, without_loading_opt_ins


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



def _same_class(configured: str, saved: str) -> bool:
    """Whether the class path a config gives and the one a checkpoint recorded name the same class. Only the
    config's, or one inside lightning_moe, is imported: a checkpoint does not get to import a module."""
    if configured == saved:
        return True
    module, _, name = configured.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    if saved == f"{cls.__module__}.{cls.__qualname__}":
        return True
    if not saved.startswith("lightning_moe."):
        return False
    module, _, name = saved.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name, None) is cls
    except ImportError:
        return False


# the method settings that decide the model's surgery (which layers are rewritten, into what) and what is trained:
# a checkpoint continues or evaluates only the run that wrote it, so these must agree with the config's
PLAN_SETTINGS = ("stage", "trainable", "train_vision_tower", "moe", "lora", "mora", "experts", "adapters", "modality")


def _plain(value: Any) -> Any:
    """`value` as plain dicts and lists (a config dataclass, a parsed Namespace, a tuple), to compare and show."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    elif isinstance(value, Namespace):
        value = value.as_dict()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def _leaves(value: Any, key: str) -> dict[str, Any]:
    """{dotted key: value} of every leaf under `key` (a dict's entries; anything else is a leaf)."""
    if not isinstance(value, dict) or not value:
        return {key: value}
    return {leaf: v for k, sub in value.items() for leaf, v in _leaves(sub, f"{key}.{k}").items()}


def plan_differences(hparams: dict[str, Any], init_args: Any) -> list[tuple[str, Any, Any]]:
    """(key, the checkpoint's value, the config's) of each `PLAN_SETTINGS` leaf both give and that differs; a
    setting the config leaves to the method's default (None) or the checkpoint does not record is not compared."""
    differences = []
    for name in PLAN_SETTINGS:
        configured = init_args.get(name) if init_args is not None else None
        if name not in hparams or configured is None:
            continue
        saved_leaves, configured_leaves = _leaves(_plain(hparams[name]), name), _leaves(_plain(configured), name)
        differences += [(key, saved_leaves[key], value) for key, value in configured_leaves.items()
                        if key in saved_leaves and saved_leaves[key] != value]
    return differences


def check_same_method(hparams: dict[str, Any], model: Any, ckpt_path: str | Path) -> None:
    """Raise `CheckpointMismatchError` when the checkpoint's recorded method class, stage or model plan (its
    surgery and trainable set, `PLAN_SETTINGS`) is not the config's `model` (which the parser requires, so a
    checkpoint never picks the class); the error names both."""
    configured_class, saved_class = model["class_path"], hparams.get("_class_path")
    init_args = model.get("init_args") or {}
    other_class = saved_class is not None and not _same_class(configured_class, saved_class)
    differences = plan_differences(hparams, init_args)
    if other_class or differences:
        shown = [("stage", hparams.get("stage"), init_args.get("stage"))]
        shown += [d for d in differences if d[0] != "stage"]
        saved = ", ".join(f"{key} {value!r}" for key, value, _ in shown)
        configured = ", ".join(f"{key} {value!r}" for key, _, value in shown)
        raise CheckpointMismatchError(
            f"--ckpt_path {ckpt_path} is a checkpoint of {saved_class or 'its method'} ({saved}), but the config runs "
            f"{configured_class} ({configured}): --ckpt_path continues or evaluates the run that wrote it; to start "
            f"a new stage from it, set model.init_args.backbone.pretrained: {ckpt_path}")


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
        if isinstance(kwargs.get("args"), list):
            kwargs["args"] = help_for_named_model(kwargs["args"])
        elif kwargs.get("args") is None:
            # rewritten in place: passing `args` as well would make Lightning warn that both were given
            sys.argv[1:] = help_for_named_model(sys.argv[1:])
        # exit_on_error=False: a parse error is raised to `main`, which prints its one line without the usage dump
        kwargs.setdefault("parser_kwargs", {"parser_mode": "omegaconf", "exit_on_error": False})
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("save_config_callback", LogDirSaveConfig)
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

    def _parse_ckpt_path(self) -> None:
        """Lightning's (the checkpoint's hyperparameters applied over the command's `model`), with the checks of the
        module docstring."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        checkpoint = load_torch_file(ckpt_path, what="--ckpt_path", remedy="Give a checkpoint that a run wrote.")
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        check_same_method(hparams, self.config[subcommand].get("model"), ckpt_path)
        hparams = without_loading_opt_ins(hparams, ckpt_path)
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)

    def add_arguments_to_parser(self, parser) -> None:
        # token ids must mean the same on both sides; the model keeps it in its hyperparameters, so a
        # checkpoint still loads without the data module
        parser.link_arguments("data.init_args.tokenizer", "model.init_args.tokenizer")

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """Lightning's trainer with the run-safety defaults (`add_run_safety`), and `StepProgressBar` in place
        of the bar Lightning adds by default (kept: a bar the config names; none: `enable_progress_bar: false`)."""
        trainer_init = self._get(self.config_init, "trainer", default={})
        # looked at before the trainer exists: Lightning appends its default bar to the callbacks
        configured = trainer_init.get("callbacks") or []
        configured = configured if isinstance(configured, list) else [configured]
        own_bar = any(isinstance(c, ProgressBar) for c in configured)
        extra_callbacks = [self._get(self.config_init, c) for c in self._parser(self.subcommand).callback_keys]
        trainer = self._instantiate_trainer(add_run_safety({**trainer_init, **kwargs}), extra_callbacks)
        default = trainer.progress_bar_callback
        if default is not None and not own_bar:
            trainer.callbacks[trainer.callbacks.index(default)] = StepProgressBar()
        return trainer


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


def end_process_group() -> None:
    """Destroy the process group the runs joined, once every rank got here. Lightning leaves it (so runs can follow
    one another in one launch); left to the interpreter's exit, gloo's worker threads can outlive it and abort the
    process ("terminate called without an active exception") after a run that succeeded. Call it last, once."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def leave_process_group_and_exit() -> None:
    """A distributed process's last call, once its results are written: `end_process_group`, then exit at once
    (status 0) without the interpreter's finalisation. Destroying the group drops only the registry's reference;
    a device mesh, an expert-parallel layer or a finished collective's work object can still hold the group and
    its tensors, and gloo's threads releasing them while the interpreter is torn down abort the process
    (SIGABRT) after it finished its work. Without a process group this returns and the interpreter exits as
    usual."""
    import logging

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    end_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


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


__all__ = ["LightningMoECLI", "LogDirSaveConfig", "NonFiniteError", "PLAN_SETTINGS", "add_run_safety",
           "check_same_method", "effective_config", "end_process_group", "help_for_named_model",
           "leave_process_group_and_exit", "main",
           "plan_differences"]

"""Loading a file never runs code: the one place that reads pickled checkpoints and decides how
Hugging Face may load a model.

- Lightning checkpoints (`.ckpt`, and any `torch.load`-able file) are read with
  `torch.load(weights_only=True)`: tensors, containers and the config dataclasses this package
  registers (`checkpoint_safe`, which the methods apply to their configs) and nothing else. A
  checkpoint naming a `lightning_moe` class that is not imported yet gets that module imported first
  (our own code, which registers its dataclasses); any other global is refused, with the file and the
  global named, before anything of the file is executed. `allow_unsafe=True` (the config key
  `backbone.allow_unsafe_checkpoint`) is the explicit opt-in for files the user trusts.
- A class that moved keeps loading under the name older checkpoints pickled: `RENAMED_CLASSES` maps
  that old name to the class's name now, for both ways of loading; no module is kept at the old path.
- Model directories are read from safetensors only: a directory with only pickle weights
  (`pytorch_model.bin`) is refused unless the same opt-in is given.
- Hugging Face never runs a repository's Python code (`trust_remote_code`) unless the config asks
  for it (`backbone.trust_remote_code`); a model that needs it fails with an error saying so.
- Each opt-in says what it trusts, one warning per file or model loaded under it: `load_torch_file` and
  `check_safe_weights` name the file or directory read with pickle, `hf_source` the model whose code may run.
- Those opt-ins (`LOADING_OPT_INS`) come only from the person running the command: the command line
  or a config file they name. A checkpoint's hyperparameters never give them (`without_loading_opt_ins`,
  applied where Lightning would rebuild a method from them: `LightningMoECLI` for `--ckpt_path`,
  `MultimodalMethod.load_from_checkpoint`).

Imports only torch, the standard library and `paths.py`, so every layer may use it.
"""

from __future__ import annotations

import copy
import importlib
import os
import pickle
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .paths import could_be_hub_id, model_source_error

__all__ = ["UnsafeFileError", "DamagedFileError", "RENAMED_CLASSES", "LOADING_OPT_INS", "checkpoint_safe",
           "load_torch_file", "without_loading_opt_ins", "check_safe_weights", "hf_load_kwargs", "raise_if_remote_code",
           "hf_source"]

OPT_IN = "backbone.allow_unsafe_checkpoint: true"
REMOTE_CODE_OPT_IN = "backbone.trust_remote_code: true"
# the settings of `backbone` that weaken loading: every place that must not take them from a file reads this list
LOADING_OPT_INS = ("allow_unsafe_checkpoint", "trust_remote_code")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


# A class that checkpoints name by a path it no longer has: the old fully-qualified name -> the one now. The class
# must be `checkpoint_safe`, which registers it under both names; only loading reads this table.
RENAMED_CLASSES = {
    "lightning_moe.models.surgery.MoEConfig": "lightning_moe.models.upcycle.MoEConfig",  # surgery.py split by job
    # Uni-MoE's expert slots: only its method uses them
    "lightning_moe.models.modality_experts.ModalityExpertsConfig": "lightning_moe.methods.unimoe.ModalityExpertsConfig",
}


class UnsafeFileError(ValueError):
    """A file would need arbitrary code (a pickle global, remote code) to load, and no opt-in was given."""


class DamagedFileError(ValueError):
    """A checkpoint is empty or truncated: it was not written completely."""


def checkpoint_safe(cls: type) -> type:
    """Class decorator: a config dataclass that a method saves in its hyperparameters may be read back by
    `torch.load(weights_only=True)` (which Lightning's resume, `fit --ckpt_path`, uses by default), also under
    the old names `RENAMED_CLASSES` gives it."""
    name = f"{cls.__module__}.{cls.__qualname__}"
    torch.serialization.add_safe_globals([cls, *((cls, old) for old, new in RENAMED_CLASSES.items() if new == name)])
    return cls


class _RenamingUnpickler(pickle.Unpickler):
    """Full pickle (the opt-in) that reads `RENAMED_CLASSES`' old names as the classes now."""

    def find_class(self, module: str, name: str) -> Any:
        module, _, name = RENAMED_CLASSES.get(f"{module}.{name}", f"{module}.{name}").rpartition(".")
        return super().find_class(module, name)


class _RenamingPickle:
    """The `pickle_module` that `torch.load` gets for the opt-in: `pickle` with `_RenamingUnpickler`."""

    Unpickler = _RenamingUnpickler

    @staticmethod
    def load(file: Any, **kwargs: Any) -> Any:
        return _RenamingUnpickler(file, **kwargs).load()


def _import_own_classes(path: Path) -> None:
    """Import the `lightning_moe` modules that a checkpoint's pickle names (for a renamed class, its module now),
    so their `checkpoint_safe` dataclasses are registered as safe globals. Only our own package is imported,
    never a module the file names elsewhere."""
    for name in torch.serialization.get_unsafe_globals_in_checkpoint(str(path)):
        module, _, _ = RENAMED_CLASSES.get(name, name).rpartition(".")
        if module == "lightning_moe" or module.startswith("lightning_moe."):
            try:
                importlib.import_module(module)
            except ImportError:  # a class path that no longer exists: the load below names it
                continue


# where launchers put a process's rank (torchrun, Lightning's own launcher, SLURM, LSF): the order Lightning reads it
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def _warn_on_first_rank(message: str) -> None:
    """A loading opt-in's warning, once per run: every process of a multi-process run loads the model, and only
    the first says so. The rank comes from the environment the launcher set (this layer imports no Lightning)."""
    rank = next((os.environ[name] for name in RANK_VARIABLES if os.environ.get(name)), "0")
    if int(rank) == 0:
        warnings.warn(message, stacklevel=3)


def load_torch_file(path: str | Path, *, allow_unsafe: bool = False, what: str = "checkpoint",
                    remedy: str = f"If you trust the file, set {OPT_IN}") -> Any:
    """`torch.load` of `path` onto the CPU without executing code from it (`remedy`: the refusal's last sentence).

    Raises FileNotFoundError / ValueError naming the file when it is missing, empty or truncated,
    and `UnsafeFileError` naming the disallowed global when the pickle holds more than weights.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist (is the path right? was the previous stage run?)")
    if path.stat().st_size == 0:
        raise DamagedFileError(f"{what} {path} is empty (0 bytes): it was not written completely; write it again")
    if allow_unsafe:
        _warn_on_first_rank(f"loading {path} with full pickle ({OPT_IN}): this runs any code the file holds; "
                            "do it only for files you trust")
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RenamingPickle)
    try:
        _import_own_classes(path)
        # mmap: tensors are paged in from the file instead of read into memory up front
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        what_global = found.group(1) if found else "a type outside the allowed ones"
        # not torch's advice (weights_only=False): that would run whatever code the file holds
        raise UnsafeFileError(
            f"{what} {path} holds {what_global}, which unpickling would call; it was refused, since loading it "
            f"with full pickle (weights_only=False) runs whatever code the file holds (only tensors, containers "
            f"and lightning_moe's config dataclasses load). {remedy}"
        ) from None
    except RuntimeError as error:
        if "zip archive" in str(error) or "PytorchStreamReader" in str(error):
            raise DamagedFileError(f"{what} {path} is truncated or corrupt ({error.__class__.__name__}: "
                             f"{str(error).splitlines()[0]}); write it again") from None
        raise


def without_loading_opt_ins(hparams: dict[str, Any], source: str | Path) -> dict[str, Any]:
    """`hparams`, the hyperparameters of the checkpoint `source`, without the `LOADING_OPT_INS` of their `backbone`:
    a backbone given as a dict loses those keys (the user's own settings, or the defaults, apply), a config object
    gets them off. One warning names the file and each refused setting that was on."""
    backbone = hparams.get("backbone")
    if backbone is None:
        return hparams
    if isinstance(backbone, dict):
        refused = [key for key in LOADING_OPT_INS if backbone.get(key)]
        backbone = {key: value for key, value in backbone.items() if key not in LOADING_OPT_INS}
    else:
        refused = [key for key in LOADING_OPT_INS if getattr(backbone, key, False)]
        backbone = copy.copy(backbone)
        for key in refused:
            setattr(backbone, key, False)
    if refused:
        settings = ", ".join(f"backbone.{key}: true" for key in refused)
        _warn_on_first_rank(f"checkpoint {source}: ignored {settings} from its hyperparameters (a loading opt-in is "
                            "taken only from the command line or a config file you name)")
    return {**hparams, "backbone": backbone}


def check_safe_weights(directory: str | Path, *, allow_unsafe: bool = False) -> None:
    """Refuse a local model directory whose weights exist only as pickle (`pytorch_model.bin`)."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    has_safetensors = any(directory.glob("*.safetensors")) or (directory / "model.safetensors.index.json").is_file()
    pickled = [name for name in PICKLE_WEIGHTS if (directory / name).is_file()]
    if not pickled or has_safetensors:
        return
    if not allow_unsafe:
        raise UnsafeFileError(
            f"{directory} holds its weights only as pickle ({', '.join(pickled)}), which loading could execute; "
            f"convert them to safetensors, or, if you trust the files, set {OPT_IN}"
        )
    _warn_on_first_rank(f"loading {directory} from pickle weights ({', '.join(pickled)}; {OPT_IN}): this runs any "
                        "code the files hold; do it only for files you trust")


def hf_load_kwargs(trust_remote_code: bool = False, allow_unsafe: bool = False) -> dict[str, Any]:
    """Keyword arguments for Hugging Face `from_pretrained` calls: no remote code unless asked; safetensors only
    unless the unsafe opt-in is given (then transformers picks what the directory has)."""
    kwargs: dict[str, Any] = {"trust_remote_code": bool(trust_remote_code)}
    if not allow_unsafe:
        kwargs["use_safetensors"] = True
    return kwargs


def raise_if_remote_code(name: str, error: Exception) -> None:
    """Raise a clearer error when `error` says the model needs its repository's Python code; else return
    (the caller re-raises `error`)."""
    text = str(error)
    if "trust_remote_code" in text or "custom code" in text:
        raise UnsafeFileError(f"{name} needs its own Python code to load (trust_remote_code); it was not run. "
                              f"If you trust that code, set {REMOTE_CODE_OPT_IN}") from error


@contextmanager
def hf_source(what: str, name_or_path: str | Path, allow_unsafe: bool = False,
              trust_remote_code: bool = False) -> Iterator[None]:
    """Around a Hugging Face `from_pretrained` of `name_or_path` (`what`: "LLM", "vision tower", ...): refuse
    pickle-only weights first, name a path that is neither local nor a possible Hub id without asking the Hub,
    and turn the loader's remote-code and not-found errors into ones that say what to do. With the
    `trust_remote_code` opt-in, one warning names the model whose code it lets run."""
    check_safe_weights(name_or_path, allow_unsafe=allow_unsafe)
    if not Path(name_or_path).exists() and not could_be_hub_id(name_or_path):
        raise model_source_error(what, name_or_path)
    if trust_remote_code:
        _warn_on_first_rank(f"loading {what} {name_or_path} with {REMOTE_CODE_OPT_IN}: the Python code shipped with "
                            "it (if any) runs; do it only for models you trust")
    try:
        yield
    except ValueError as error:
        raise_if_remote_code(str(name_or_path), error)
        raise
    except OSError as error:
        if Path(name_or_path).exists():
            raise
        raise model_source_error(what, name_or_path, error) from error

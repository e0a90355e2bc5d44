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

Imports only torch, the standard library and `paths.py`, so every layer may use it.
"""

from __future__ import annotations

import importlib
import pickle
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .paths import could_be_hub_id, model_source_error

__all__ = ["UnsafeFileError", "RENAMED_CLASSES", "checkpoint_safe", "load_torch_file", "check_safe_weights",
           "hf_load_kwargs", "raise_if_remote_code", "hf_source"]

OPT_IN = "backbone.allow_unsafe_checkpoint: true"
REMOTE_CODE_OPT_IN = "backbone.trust_remote_code: true"
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


def load_torch_file(path: str | Path, *, allow_unsafe: bool = False, what: str = "checkpoint") -> Any:
    """`torch.load` of `path` onto the CPU without executing code from it.

    Raises FileNotFoundError / ValueError naming the file when it is missing, empty or truncated,
    and `UnsafeFileError` naming the disallowed global when the pickle holds more than weights.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist (is the path right? was the previous stage run?)")
    if path.stat().st_size == 0:
        raise ValueError(f"{what} {path} is empty (0 bytes): it was not written completely; write it again")
    if allow_unsafe:
        warnings.warn(f"loading {path} with full pickle ({OPT_IN}): this runs any code the file holds; "
                      "do it only for files you trust", stacklevel=2)
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RenamingPickle)
    try:
        _import_own_classes(path)
        # mmap: tensors are paged in from the file instead of read into memory up front
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        what_global = found.group(1) if found else "a type outside the allowed ones"
        raise UnsafeFileError(
            f"{what} {path} holds {what_global}, which loading would have to execute; it was refused "
            f"(only tensors, containers and lightning_moe's config dataclasses load). If you trust the file, "
            f"set {OPT_IN}"
        ) from None
    except RuntimeError as error:
        if "zip archive" in str(error) or "PytorchStreamReader" in str(error):
            raise ValueError(f"{what} {path} is truncated or corrupt ({error.__class__.__name__}: "
                             f"{str(error).splitlines()[0]}); write it again") from None
        raise


def check_safe_weights(directory: str | Path, *, allow_unsafe: bool = False) -> None:
    """Refuse a local model directory whose weights exist only as pickle (`pytorch_model.bin`)."""
    directory = Path(directory)
    if not directory.is_dir() or allow_unsafe:
        return
    has_safetensors = any(directory.glob("*.safetensors")) or (directory / "model.safetensors.index.json").is_file()
    pickled = [name for name in PICKLE_WEIGHTS if (directory / name).is_file()]
    if pickled and not has_safetensors:
        raise UnsafeFileError(
            f"{directory} holds its weights only as pickle ({', '.join(pickled)}), which loading could execute; "
            f"convert them to safetensors, or, if you trust the files, set {OPT_IN}"
        )


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
def hf_source(what: str, name_or_path: str | Path, allow_unsafe: bool = False) -> Iterator[None]:
    """Around a Hugging Face `from_pretrained` of `name_or_path` (`what`: "LLM", "vision tower", ...): refuse
    pickle-only weights first, name a path that is neither local nor a possible Hub id without asking the Hub,
    and turn the loader's remote-code and not-found errors into ones that say what to do."""
    check_safe_weights(name_or_path, allow_unsafe=allow_unsafe)
    if not Path(name_or_path).exists() and not could_be_hub_id(name_or_path):
        raise model_source_error(what, name_or_path)
    try:
        yield
    except ValueError as error:
        raise_if_remote_code(str(name_or_path), error)
        raise
    except OSError as error:
        if Path(name_or_path).exists():
            raise
        raise model_source_error(what, name_or_path, error) from error

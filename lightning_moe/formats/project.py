"""The project's own formats: a `save_pretrained` directory, and a Lightning checkpoint of any method here.

- directory: `multimodal_config.json` (every sub-config, the connector kinds, the placeholder ids and
  the surgery log) and `model.safetensors`, written and read by the model itself
  (`MultimodalLM.save_pretrained` / `from_pretrained`, which replays the surgery). The export is
  `save_pretrained`.
- checkpoint: a `torch.save` file (what Lightning writes) whose `multimodal_config` entry
  (`CHECKPOINT_CONFIG_KEY`, put there by the method's `on_save_checkpoint`) holds the same record,
  and whose state dict holds the weights under `model.`. Read without executing code from it
  (`safe_load.load_torch_file`); `allow_unsafe` is the explicit opt-in for trusted files.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

from ..models.multimodal import CONFIG_NAME, MultimodalLM
from ..safe_load import load_torch_file
from .base import ModelFormat

__all__ = ["PROJECT_DIRECTORY", "LIGHTNING_CHECKPOINT", "CHECKPOINT_CONFIG_KEY", "CHECKPOINT_SUFFIXES",
           "is_project_directory", "is_checkpoint", "model_from_checkpoint"]

# key of the model config inside a Lightning checkpoint written by any method (methods/base.py)
CHECKPOINT_CONFIG_KEY = "multimodal_config"
# file names a checkpoint goes by; a file named otherwise is one when it is a torch zip archive
CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth")


def is_project_directory(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG_NAME).is_file()


def load_project_directory(path: Path, **_: Any) -> MultimodalLM:
    """Read by the model itself (no tokenizer, dtype or remote code enter: every record is in the directory)."""
    return MultimodalLM.from_pretrained(path)


def is_checkpoint(path: Path) -> bool:
    """A checkpoint by name (so that a truncated or empty one gets the loader's error naming the damage), or a
    torch zip archive (`<archive>/data.pkl`) by content."""
    if not path.is_file():
        return False
    if path.suffix in CHECKPOINT_SUFFIXES:
        return True
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/data.pkl") for name in archive.namelist())


def load_checkpoint(path: Path, *, allow_unsafe: bool = False, **_: Any) -> MultimodalLM:
    return model_from_checkpoint(load_torch_file(path, allow_unsafe=allow_unsafe, what="pretrained backbone checkpoint"),
                                 path)


def model_from_checkpoint(checkpoint: dict[str, Any], path: str | Path = "checkpoint") -> MultimodalLM:
    """The `MultimodalLM` a Lightning checkpoint of any method here holds (its recorded config and weights)."""
    if CHECKPOINT_CONFIG_KEY not in checkpoint:
        raise ValueError(f"{path} is not a lightning-moe checkpoint (no {CHECKPOINT_CONFIG_KEY!r} entry)")
    model = MultimodalLM.from_config_dict(checkpoint[CHECKPOINT_CONFIG_KEY], path)  # initialised: see from_pretrained
    prefix = "model."
    state = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    model.load_state_dict(state, strict=True)
    return model


PROJECT_DIRECTORY = ModelFormat("project", f"a lightning-moe save_pretrained directory ({CONFIG_NAME})",
                                is_project_directory, load_project_directory)
LIGHTNING_CHECKPOINT = ModelFormat("checkpoint", "a Lightning checkpoint of a method here (.ckpt)", is_checkpoint,
                                   load_checkpoint)

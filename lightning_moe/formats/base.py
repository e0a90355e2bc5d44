"""What every model format shares: the `ModelFormat` record a format module registers, the errors, reading
a format's JSON files (`read_json_config`) and a Hugging Face directory (a Hub id downloaded to one)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..models.multimodal import MultimodalLM
from ..paths import model_source_error

__all__ = ["ModelFormat", "NotExportable", "UnknownFormatError", "read_json_config", "resolve_model_dir",
           "ORIGINAL_LLAVA_KEYS"]

# config.json keys that mark original LLaVA / MoE-LLaVA: the other Hugging Face formats' detectors refuse them
ORIGINAL_LLAVA_KEYS = ("mm_vision_tower", "mm_image_tower", "mm_projector_type", "mm_hidden_size")
# load(path, *, tokenizer, torch_dtype, trust_remote_code, allow_unsafe) -> the model
Loader = Callable[..., MultimodalLM]


@dataclass(frozen=True)
class ModelFormat:
    """One layout of a model on disk.

    `detect(path)` answers from the local file or directory alone (cheap: names and small JSON files,
    never the weights), and no two formats' detectors accept the same layout. `load(path, *,
    tokenizer, torch_dtype, trust_remote_code, allow_unsafe)` returns the `MultimodalLM`, or raises
    a ValueError saying why this layout is no backbone and what to do instead.
    """

    name: str
    description: str  # what it is, as an error message names it: "a llava-hf transformers directory (...)"
    detect: Callable[[Path], bool]
    load: Loader


class NotExportable(ValueError):
    """The model has no export in the requested format: the message says why and what would make it one."""


class UnknownFormatError(ValueError):
    """No registered format recognises a path: the message names the path and every format tried."""


def read_json_config(config_file: Path) -> dict[str, Any] | None:
    """A format's JSON file (`config.json`, `adapter_config.json`) as a dict, or None where there is no such file;
    a file that is not a JSON object is an error naming it."""
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_file} is not valid JSON ({error}); its directory cannot be read as a model or "
                         "adapters") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} holds a JSON {type(config).__name__}, not an object of settings")
    return config


def resolve_model_dir(name_or_path: str | Path, what: str = "model") -> Path:
    """A local directory as given; else a Hugging Face Hub repository id, downloaded (config, safetensors,
    tokenizer files). A path that is neither gets an error naming it."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(name_or_path), allow_patterns=[
            "*.json", "*.safetensors", "*.model", "*.jinja", "*.txt", "*.tiktoken"]))
    except Exception as error:  # noqa: BLE001  (validation, network, missing repo: all mean "not reachable")
        raise model_source_error(what, name_or_path, error) from error

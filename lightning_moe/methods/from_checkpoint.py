"""Self-contained checkpoints: what a method needs to rebuild its model travels in its checkpoint.

A Lightning checkpoint of any method here holds the model's recorded config (every sub-config and
the surgery log, `formats.CHECKPOINT_CONFIG_KEY`), its weights, and the tokenizer's files
(`TOKENIZER_FILES_KEY`). While `rebuilding_from(checkpoint)` is active, a method's `__init__` builds
its model from that record instead of from the configured sources (`backbone.pretrained`, a base LLM
name, `adapters_path`) and does not apply its stage's surgery again (the log holds it); a tokenizer
path that no longer resolves is restored from the checkpoint's copy. So `load_from_checkpoint` and
`main.py validate|test|predict --ckpt_path` work from any working directory, after the stage
directories were moved away. The teacher of a distillation method is loaded only when training uses it.

`MultimodalMethod.load_from_checkpoint` and the CLI (for validate/test/predict) enter it; training
from a checkpoint (`fit --ckpt_path`) keeps Lightning's resume path, which needs the run's inputs anyway.
"""

from __future__ import annotations

import contextlib
import contextvars
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from ..formats import CHECKPOINT_CONFIG_KEY
from ..paths import resolve_data_path
from ..safe_load import load_torch_file
from ..tokens import load_tokenizer

__all__ = ["TOKENIZER_FILES_KEY", "rebuilding_from", "recorded_model_config", "tokenizer_files", "method_tokenizer"]

TOKENIZER_FILES_KEY = "tokenizer_files"  # file name -> bytes of the tokenizer's save_pretrained directory

# the checkpoint being rebuilt from (its model config and tokenizer files), while `rebuilding_from` is active
_RECORD: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("lightning_moe_rebuild", default=None)


@contextlib.contextmanager
def rebuilding_from(checkpoint: str | Path | dict[str, Any], allow_unsafe: bool = False) -> Iterator[None]:
    """Within the block, methods build their model from `checkpoint`'s record (module docstring).
    A checkpoint without a record (not written by a method here) changes nothing."""
    if not isinstance(checkpoint, dict):
        checkpoint = load_torch_file(checkpoint, allow_unsafe=allow_unsafe, what="checkpoint")
    record = None
    if CHECKPOINT_CONFIG_KEY in checkpoint:
        record = {"config": checkpoint[CHECKPOINT_CONFIG_KEY], "tokenizer": checkpoint.get(TOKENIZER_FILES_KEY)}
    token = _RECORD.set(record)
    try:
        yield
    finally:
        _RECORD.reset(token)


def recorded_model_config() -> dict[str, Any] | None:
    """The model config of the checkpoint being rebuilt from, or None outside `rebuilding_from`."""
    record = _RECORD.get()
    return None if record is None else record["config"]


def tokenizer_files(tokenizer: PreTrainedTokenizerBase) -> dict[str, bytes]:
    """The tokenizer's `save_pretrained` files, for the checkpoint (kilobytes to a few megabytes)."""
    with tempfile.TemporaryDirectory() as directory:
        tokenizer.save_pretrained(directory)
        return {p.name: p.read_bytes() for p in Path(directory).iterdir() if p.is_file()}


def method_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    """`load_tokenizer(name_or_path)`; while rebuilding from a checkpoint whose tokenizer path no longer resolves
    (moved, or a relative path from another directory), the copy the checkpoint holds."""
    record = _RECORD.get()
    files = None if record is None else record.get("tokenizer")
    if files and not resolve_data_path(name_or_path).exists():
        directory = Path(tempfile.mkdtemp(prefix="lightning_moe_tokenizer_"))
        for name, data in files.items():
            (directory / Path(name).name).write_bytes(data)  # a bare name: never outside the directory
        return load_tokenizer(directory)
    return load_tokenizer(name_or_path)

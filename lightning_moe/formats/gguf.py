"""A GGUF file (llama.cpp's one-file format) of a causal LM, in: the LLM of a text-only model.

`backbone.llm` and `data.tokenizer` take such a file (or a packaged name, `gguf_files.PACKAGED_GGUF`)
wherever they take a transformers name: `build_llm` and `load_tokenizer` read the directory it is
converted to once (`gguf_files.converted_directory`: weights dequantised, tokenizer and chat template
from the same file, safetensors). As a backbone (`backbone.pretrained`, the `--model` of
`python -m lightning_moe.export` and of the EdgeMoE command) it is that LLM with no encoders, its
tokenizer the file's. Nothing written afterwards refers to the GGUF file: a checkpoint or
`save_pretrained` directory holds the dequantised weights.

Detected by the file's suffix or its magic bytes (`GGUF`); the architectures transformers cannot read
from GGUF are refused with that reason when the file is read (`gguf_files.supported_architectures`).
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerBase

from ..gguf_files import converted_directory
from ..models.multimodal import MultimodalLM, build_multimodal
from ..tokens import load_tokenizer
from .base import ModelFormat

__all__ = ["GGUF", "is_gguf"]

GGUF_MAGIC = b"GGUF"


def is_gguf(path: Path) -> bool:
    """A GGUF file by name (so that a damaged one gets the reader's error naming it), or by its magic bytes."""
    if not path.is_file():
        return False
    if path.suffix == ".gguf":
        return True
    with path.open("rb") as file:
        return file.read(len(GGUF_MAGIC)) == GGUF_MAGIC


def load_gguf(path: Path, *, tokenizer: PreTrainedTokenizerBase | None = None, torch_dtype: str | None = None,
              **_: object) -> MultimodalLM:
    """The file's LLM as a text-only model, dequantised to `torch_dtype` (float32 if None); `tokenizer`
    defaults to the file's own."""
    directory = converted_directory(path)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(directory)
    return build_multimodal(tokenizer, str(directory), encoders={}, torch_dtype=torch_dtype)


GGUF = ModelFormat("gguf", "a GGUF file of a causal LM (.gguf; read through transformers, dequantised)", is_gguf,
                   load_gguf)

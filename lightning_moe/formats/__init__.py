"""Model formats on disk, above the model: one module per layout, each with its detector, its loader
and, where the layout can be written, its exporter.

- `project.py`: the project's own layouts: a `save_pretrained` directory (`multimodal_config.json`,
  read and written by `MultimodalLM` itself) and a Lightning checkpoint of any method here
- `llava_hf.py`: llava-hf `LlavaForConditionalGeneration` directories in and out (`export_multimodal`)
- `llava_original.py`: original LLaVA / MoE-LLaVA directories in
- `hf_causal_lm.py`: transformers `AutoModelForCausalLM` directories out (`to_hf_causal_lm`,
  `export_llm`: the LLM, dense or sparse); one given as a backbone is refused with where it goes instead
- `gguf.py`: GGUF files (llama.cpp's) of a causal LM in, as a text-only model; `backbone.llm` and the
  tokenizer take them through `gguf_files` (below `models/`)
- `peft.py`: peft LoRA adapter directories in and out (adapters on a model, read by `load_adapters`)
- `base.py`: the `ModelFormat` record, the errors, reading a Hugging Face directory

`load_backbone(path)` is the one place that picks a format: `FORMATS` in order, the first whose
detector accepts the path (a Hugging Face Hub id is downloaded to a directory first). No two
detectors accept the same layout; the order only settles a directory that holds two (the
project's own layouts come first). A path no format recognises is an `UnknownFormatError`
naming it and every format tried.

A new format is one module that defines its `ModelFormat(name, description, detect, load)` and one
line in `FORMATS`. `lightning_moe.models` never imports this package.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerBase

from ..models.adapters import load_adapters as load_project_adapters
from ..gguf_files import packaged_gguf
from ..models.multimodal import MultimodalLM
from ..paths import could_be_hub_id, model_source_error
from .base import ModelFormat, NotExportable, UnknownFormatError, resolve_model_dir
from .gguf import GGUF
from .hf_causal_lm import HF_CAUSAL_LM, export_llm, to_hf_causal_lm
from .llava_hf import LLAVA_HF, export_multimodal, to_llava_hf
from .llava_original import LLAVA_ORIGINAL
from .peft import PeftFormatError, export_peft, is_peft_directory, load_peft_lora, without_adapters
from .project import CHECKPOINT_CONFIG_KEY, LIGHTNING_CHECKPOINT, PROJECT_DIRECTORY, model_from_checkpoint

__all__ = ["FORMATS", "ModelFormat", "UnknownFormatError", "NotExportable", "PeftFormatError", "detect_format",
           "load_backbone", "load_adapters", "CHECKPOINT_CONFIG_KEY", "model_from_checkpoint", "to_llava_hf",
           "export_multimodal", "to_hf_causal_lm", "export_llm", "export_peft", "without_adapters"]

FORMATS: tuple[ModelFormat, ...] = (
    PROJECT_DIRECTORY,
    LIGHTNING_CHECKPOINT,
    LLAVA_HF,
    LLAVA_ORIGINAL,
    HF_CAUSAL_LM,
    GGUF,
)


def detect_format(path: str | Path) -> ModelFormat:
    """The format of the local file or directory `path` (module docstring); Hub ids are `load_backbone`'s."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist ({path.resolve()}): no file or directory to read a model from")
    for model_format in FORMATS:
        if model_format.detect(path):
            return model_format
    tried = "; ".join(f"{f.name}: {f.description}" for f in FORMATS)
    raise UnknownFormatError(f"{path} is in no model format this project reads. Tried, in order: {tried}")


def load_backbone(path: str | Path, allow_unsafe: bool = False, tokenizer: PreTrainedTokenizerBase | None = None,
                  torch_dtype: str | None = None, trust_remote_code: bool = False) -> MultimodalLM:
    """The `MultimodalLM` at `path`, a local file or directory in any format of `FORMATS`, or a Hugging Face
    Hub id (downloaded), or a packaged GGUF name (`gguf_files.PACKAGED_GGUF`). `tokenizer` maps a llava-hf /
    original-LLaVA image token.

    Checkpoints are read without executing code from them (`safe_load.load_torch_file`);
    `allow_unsafe` is the explicit opt-in (`backbone.allow_unsafe_checkpoint`) for trusted files.
    """
    path = packaged_gguf(str(path)) or Path(path)
    if not path.exists():
        if not could_be_hub_id(path):
            raise model_source_error("pretrained backbone", path)
        path = resolve_model_dir(path, "pretrained backbone")
    return detect_format(path).load(path, tokenizer=tokenizer, torch_dtype=torch_dtype,
                                    trust_remote_code=trust_remote_code, allow_unsafe=allow_unsafe)


def load_adapters(model: MultimodalLM, directory: str | Path) -> MultimodalLM:
    """Adapters onto `model`, in place: a peft LoRA directory (`peft.load_peft_lora`) or the project's own
    (`models.load_adapters`, whose errors name what a directory of neither lacks). Returns the model."""
    directory = Path(directory)
    if is_peft_directory(directory):
        return load_peft_lora(model, directory)
    return load_project_adapters(model, directory)

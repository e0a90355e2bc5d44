"""`python -m lightning_moe.export`: a trained model -> a directory that plain transformers loads.

    python -m lightning_moe.export --model CKPT_OR_DIR --out DIR [--format hf|peft|project]
                                   [--text-only] [--merge-lora] [--tokenizer NAME_OR_PATH]
                                   [--allow-unsafe-checkpoint]

  --model       a `save_pretrained` directory or a Lightning .ckpt written by any method here, or a GGUF
                file of a causal LM (or a packaged name, `smollm2-135m-instruct`): its LLM, dequantised
  --format hf   (default) a transformers directory: config.json, weights, generation config and the
                tokenizer's files. A multimodal model becomes a `LlavaForConditionalGeneration` directory
                with its processor (`formats/llava_hf.py`). A text-only model (no encoders), or any model with --text-only, becomes
                the `AutoModelForCausalLM` of its LLM (`formats/hf_causal_lm.py`): dense stays its own family, a
                converted native MoE goes back to its family (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE), an
                upcycled Llama becomes Mixtral or Qwen2-MoE; a model no family represents is refused with
                the reason and the setting that would make it exportable.
  --format peft a peft LoRA adapter (`adapter_config.json`, peft's key names; `formats/peft.py`) in DIR
                and the base it goes on in DIR/base, the model without its adapters as --format hf writes
                it (a sparse LLM as its MoE family). Plain LoRA keeps its module names; each expert's LoRA
                (moe_lora) becomes peft's `target_parameters` on the stacked experts (peft >= 0.17).
                Refused, with the reason: MoLE / MoRA adapters (per-token routing peft cannot represent),
                LoRA on a router, and a base no transformers family represents (the --format hf refusal).
  --format project  the project's own `save_pretrained` directory; with --merge-lora this is `merge_lora`
                as a command (plain LoRA folded into the base weights, the adapters gone from the log).
  --merge-lora  fold plain LoRA adapters into their base weights first (MoLE / MoRA cannot be: an error).
  --allow-unsafe-checkpoint  read a .ckpt with full pickle (safe_load.py); by default nothing in it runs.

The export writes what transformers reads; it never writes a `multimodal_config.json`, and
`build_llm` refuses the project's own directories, so neither is taken for the other.
Layering: this command imports formats/ and models/ (`load_backbone` reads a .ckpt), never methods/ or Lightning.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Literal

from transformers import PreTrainedTokenizerBase

from .formats import (NotExportable, detect_format, export_llm, export_multimodal, export_peft, load_backbone,
                      to_hf_causal_lm, without_adapters)
from .formats.gguf import GGUF
from .formats.project import LIGHTNING_CHECKPOINT, PROJECT_DIRECTORY
from .gguf_files import packaged_gguf
from .models import MultimodalLM, merge_lora
from .safe_load import OPT_IN, load_torch_file
from .tokens import DEFAULT_TOKENIZER, load_tokenizer

__all__ = ["ExportFormat", "export", "load_for_export", "main"]

ExportFormat = Literal["hf", "peft", "project"]
FORMATS: tuple[str, ...] = ("hf", "peft", "project")


def load_for_export(path: str | Path, allow_unsafe: bool = False) -> tuple[MultimodalLM, str | None]:
    """The model at `path` and its tokenizer: the one a checkpoint's hyperparameters name, the directory
    itself where `SavePretrained` wrote the tokenizer beside the model, a GGUF file's own (else None)."""
    path = packaged_gguf(str(path)) or Path(path)
    found = detect_format(path)
    if found not in (PROJECT_DIRECTORY, LIGHTNING_CHECKPOINT, GGUF):
        raise NotExportable(f"{path} is {found.description}, not {PROJECT_DIRECTORY.description}, "
                            f"{LIGHTNING_CHECKPOINT.description} or {GGUF.description}: nothing to export")
    model = load_backbone(path, allow_unsafe=allow_unsafe).eval()
    if found is GGUF:
        return model, str(path)
    tokenizer = str(path) if (path / "tokenizer_config.json").is_file() else None
    if path.is_file():
        # the method's hyperparameters name the tokenizer it trained with (read without running code, mmap)
        tokenizer = load_torch_file(path, allow_unsafe=allow_unsafe).get("hyper_parameters", {}).get("tokenizer")
    return model, tokenizer


def _check_tokenizer(model: MultimodalLM, tokenizer: PreTrainedTokenizerBase, name: str) -> None:
    rows = model.llm.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise NotExportable(f"the tokenizer {name} has {len(tokenizer)} tokens but the model's embedding only {rows}: "
                            "not the tokenizer this model was trained with; pass --tokenizer")


def export(model: MultimodalLM, out: str | Path, format: ExportFormat = "hf",
           tokenizer: PreTrainedTokenizerBase | None = None, text_only: bool = False,
           merge: bool = False) -> Path:
    """Write `model` to `out` in `format` (module docstring); returns `out`."""
    if format not in FORMATS:
        raise NotExportable(f"unknown format {format!r}; choose one of {FORMATS}")
    if merge:
        merge_lora(model)
    out = Path(out)
    if format == "project":
        model.save_pretrained(out)
        return out
    if format == "peft":
        # the adapters as peft writes them, and beside them (out/base) the base they go on
        export_peft(model, out, base="causal_lm" if (text_only or not model.encoders) else "llava")
        export(without_adapters(model), out / "base", "hf", tokenizer, text_only=text_only)
        return out
    if model.encoders and not text_only:
        # a sparse or otherwise rewritten LLM goes through the same family mapping as a text-only export
        language_model = to_hf_causal_lm(model) if model.surgery else None
        return export_multimodal(model, out, tokenizer, language_model=language_model)
    return export_llm(model, out, tokenizer)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lightning_moe.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="save_pretrained directory, Lightning .ckpt or GGUF file")
    parser.add_argument("--out", required=True, help="directory to write")
    parser.add_argument("--format", default="hf", choices=FORMATS, help="what to write (see above)")
    parser.add_argument("--text-only", action="store_true", help="export only the language model (no encoders)")
    parser.add_argument("--merge-lora", action="store_true", help="fold plain LoRA into the base weights first")
    parser.add_argument("--allow-unsafe-checkpoint", action="store_true",
                        help=f"read a .ckpt with full pickle (runs its code; the CLI's {OPT_IN}): trusted files")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer to write beside the model (default: the checkpoint's or the directory's, "
                             f"else {DEFAULT_TOKENIZER})")
    return parser


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    if Path(args.out).resolve() == Path(args.model).resolve():
        raise NotExportable(f"--out {args.out} is the model itself; write the export elsewhere")
    model, recorded = load_for_export(args.model, allow_unsafe=args.allow_unsafe_checkpoint)
    tokenizer = None
    if args.format in ("hf", "peft"):
        name = args.tokenizer or recorded or DEFAULT_TOKENIZER
        tokenizer = load_tokenizer(name)
        _check_tokenizer(model, tokenizer, name)
    out = export(model, args.out, args.format, tokenizer, text_only=args.text_only, merge=args.merge_lora)
    print(f"exported {args.model} -> {out} ({args.format}{', text only' if args.text_only else ''})")
    return out


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as err:  # the reason is the message (refusals say why): no traceback
        sys.exit(f"error: {err}")

"""The tokenizer, the placeholder tokens and answer normalisation: what `data/`, `models/`, `metrics/`
and `inference/` share (docs/architecture.md), kept free of Lightning and torchmetrics.

The data side writes one placeholder token per modality item into `input_ids`; the model side
replaces each with the projected encoder features. Both load the tokenizer through
`load_tokenizer`, which guarantees two things the rest of the pipeline relies on:

- a pad token (collate pads with it; labels there are -100 anyway, so its identity is free);
- the placeholder of every registered modality (`lightning_moe.modalities`: `<image>`, `<audio>`,
  `<video>`, then any registered later) is ONE special token, so that each placeholder in the text is
  exactly one id the model can find and expand. Missing ones are added, in registration order; the
  model resizes its embeddings to `len(tokenizer)`.

`normalize_answer` is the one definition of when a generated answer matches a reference: the
`ExactMatch` metric (training-time evaluation) and EdgeMoE's exact-match quality (`inference/plan.py`)
both use it.
"""

from pathlib import Path

from tokenizers import AddedToken
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .gguf_files import transformers_source
from .modalities import modalities
from .paths import could_be_hub_id, model_source_error, resolve_data_path
from .safe_load import raise_if_remote_code

IGNORE_INDEX = -100

__all__ = ["IGNORE_INDEX", "DEFAULT_TOKENIZER", "load_tokenizer", "placeholder_token_ids", "normalize_answer"]

# Relative to the repository root, where configs are run from (see `paths.resolve_data_path`).
DEFAULT_TOKENIZER = "data/tokenizer"


def load_tokenizer(
    name_or_path: str | Path = DEFAULT_TOKENIZER, chat_template: str | None = None
) -> PreTrainedTokenizerBase:
    """`AutoTokenizer.from_pretrained` plus a pad token and single-token placeholders.

    `chat_template` replaces the tokenizer's own (for base-model tokenizers that have none). A GGUF file or
    packaged name reads the tokenizer and chat template the file holds (`gguf_files.transformers_source`).
    """
    path = resolve_data_path(transformers_source(name_or_path))
    if not path.exists() and not could_be_hub_id(name_or_path):  # a typo in a path: no Hub request
        raise model_source_error("tokenizer", name_or_path)
    try:
        # a tokenizer never runs its repository's Python code here (safe_load.py)
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except ValueError as error:
        raise_if_remote_code(str(name_or_path), error)
        raise
    except OSError as error:
        if path.exists():
            raise
        raise model_source_error("tokenizer", name_or_path, error) from error
    if chat_template is not None:
        tokenizer.chat_template = chat_template

    added = tokenizer.get_added_vocab()
    missing = [s.placeholder for s in modalities() if s.placeholder not in added]
    if missing:
        # normalized=False: a lower-casing normalizer must not turn "<image>" into something else.
        tokenizer.add_tokens([AddedToken(p, special=True, normalized=False) for p in missing], special_tokens=True)
    for placeholder, token_id in placeholder_token_ids(tokenizer).items():
        encoded = tokenizer(f"a {placeholder}\nb", add_special_tokens=False)["input_ids"]
        if encoded.count(token_id) != 1:
            raise ValueError(f"tokenizer {name_or_path!r} does not keep {placeholder!r} as one token: {encoded}")

    if tokenizer.pad_token is None:
        # Reusing unk (as LLaVA does for Llama) avoids growing the vocabulary; else add one.
        if tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer


def placeholder_token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """Placeholder text -> its token id, for every registered modality's placeholder."""
    return {s.placeholder: tokenizer.convert_tokens_to_ids(s.placeholder) for s in modalities()}


def normalize_answer(text: str) -> str:
    """Lower-case, trim, drop a trailing period (VQA-style exact match, kept deliberately simple)."""
    return text.strip().lower().rstrip(".").strip()

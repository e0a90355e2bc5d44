"""llava-hf's `LlavaForConditionalGeneration` directories in and out.

Detected by its `config.json`: `model_type: llava` with a `text_config`, and no `mm_*` keys (those
mark original LLaVA, `llava_original.py`).

In (`load_llava_hf`): loaded with transformers' own `LlavaForConditionalGeneration.from_pretrained`
(so every key layout it reads works), then its parts become ours without a copy: the vision tower
(`vision_feature_layer`, the select strategy), `multi_modal_projector` (linear_1, GELU, linear_2 =
our `mlp2x_gelu`), the language model with its `lm_head`, and `image_token_index` as the image
placeholder id. llava-hf tokenizers hold `<image>` at `image_token_index` (checked), so the image
token is mapped, not duplicated.

Out (`to_llava_hf`, `export_multimodal`): config.json (`LlavaConfig` with our vision config, text
config, placeholder id, feature layer and strategy), safetensors weights, the tokenizer, and a
`LlavaProcessor` whose image processor does what the data pipeline's default transform does.

The helpers under "shared with original LLaVA" map the tokenizer's image token and fit the
embedding for `llava_original.py` too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    CLIPImageProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ..models.connectors import build_connector
from ..modalities.image import IMAGE_TOKEN, VISION_MODELS, VisionTower
from ..models.multimodal import MultimodalLM
from ..safe_load import hf_load_kwargs, hf_source
from .base import ORIGINAL_LLAVA_KEYS, ModelFormat, NotExportable, read_json_config

__all__ = ["LLAVA_HF", "is_llava_hf", "load_llava_hf", "to_llava_hf", "image_processor_for", "export_multimodal"]


def is_llava_hf(path: Path) -> bool:
    config = read_json_config(path / "config.json")
    return (config is not None and config.get("model_type") == "llava" and "text_config" in config
            and not any(k in config for k in ORIGINAL_LLAVA_KEYS))


# ---------------------------------------------------------------------------- shared with original LLaVA
def image_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id of the tokenizer's image placeholder; an error when it has none."""
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {IMAGE_TOKEN!r} token (load it with lightning_moe.tokens.load_tokenizer)")
    return token_id


def fit_embeddings(llm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None) -> None:
    """Grow the embedding to the tokenizer (placeholders it added). The new rows are placeholders only: never
    embedded (features replace them), and a zero output row, so their logit is 0 instead of a random value."""
    rows = llm.get_input_embeddings().num_embeddings
    if tokenizer is None or len(tokenizer) <= rows:
        return
    llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        llm.get_input_embeddings().weight[rows:] = 0
        out = llm.get_output_embeddings()
        if out is not None:
            out.weight[rows:] = 0
            if getattr(out, "bias", None) is not None:
                out.bias[rows:] = 0


def finish_generation(llm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None) -> None:
    """Generation stops and pads with the tokenizer's tokens, not the checkpoint's."""
    if tokenizer is not None:
        llm.generation_config.pad_token_id = tokenizer.pad_token_id
        llm.generation_config.eos_token_id = tokenizer.eos_token_id


# ---------------------------------------------------------------------------- llava-hf in
def _causal_lm_around(base: nn.Module, lm_head: nn.Module, config: Any) -> PreTrainedModel:
    """The family's `*ForCausalLM` holding `base` (the decoder stack) and `lm_head` themselves: no copy."""
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(config)
    setattr(llm, llm.base_model_prefix, base)
    llm.lm_head = lm_head
    left = [n for n, t in [*llm.named_parameters(), *llm.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{type(llm).__name__} has parts besides its {llm.base_model_prefix!r} and lm_head "
                         f"({left[:4]}); its llava-hf checkpoint cannot be taken apart here")
    return llm


def load_llava_hf(directory: str | Path, *, tokenizer: PreTrainedTokenizerBase | None = None,
                  torch_dtype: str | None = None, trust_remote_code: bool = False,
                  allow_unsafe: bool = False) -> MultimodalLM:
    """A llava-hf `LlavaForConditionalGeneration` directory as a `MultimodalLM` with the same weights."""
    directory = Path(directory)
    config = LlavaConfig.from_pretrained(directory)
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"{directory}: vision_feature_layer {layer} (several layers concatenated) is not supported; "
                         "a single layer index is")
    if config.projector_hidden_act != "gelu" or not getattr(config, "multimodal_projector_bias", True):
        raise ValueError(f"{directory}: projector with act {config.projector_hidden_act!r} and bias "
                         f"{getattr(config, 'multimodal_projector_bias', True)} is not LLaVA's mlp2x_gelu")
    image_id = config.image_token_index
    if tokenizer is not None and image_token_id(tokenizer) != image_id:
        raise ValueError(
            f"{directory}: the checkpoint's image_token_index is {image_id} but the tokenizer maps {IMAGE_TOKEN!r} to "
            f"{image_token_id(tokenizer)}: use the tokenizer saved with the checkpoint (tokenizer: {directory})"
        )
    dtype = getattr(torch, torch_dtype) if torch_dtype else None
    # hf_source: the remote-code error made clear, and the trust_remote_code opt-in named, as for every model loaded
    with hf_source("llava-hf model", directory, allow_unsafe, trust_remote_code):
        hf = LlavaForConditionalGeneration.from_pretrained(directory, dtype=dtype,
                                                           **hf_load_kwargs(trust_remote_code, allow_unsafe))
    inner = hf.model
    tower_model = inner.vision_tower
    if type(tower_model).__name__ not in set(VISION_MODELS.values()):
        raise ValueError(f"{directory}: vision tower {type(tower_model).__name__} is not one of "
                         f"{sorted(set(VISION_MODELS.values()))}")
    strategy = config.vision_feature_select_strategy
    has_cls = _has_cls(tower_model.config)
    if strategy == "default" and not has_cls:
        raise ValueError(f"{directory}: strategy 'default' drops the first token of a tower without a CLS token "
                         f"({type(tower_model).__name__}); not supported")
    tower = VisionTower(tower_model, layer, select_strategy="patch" if strategy == "default" else "full")
    projector = inner.multi_modal_projector
    connector = build_connector("mlp2x_gelu", projector.linear_1.in_features, projector.linear_2.out_features)
    connector[0], connector[2] = projector.linear_1, projector.linear_2
    llm = _causal_lm_around(inner.language_model, hf.lm_head, config.text_config)
    fit_embeddings(llm, tokenizer)
    finish_generation(llm, tokenizer)
    model = MultimodalLM(llm, {"image": tower}, {"image": connector}, {"image": "mlp2x_gelu"}, {"image": image_id})
    # from_pretrained hands back eval mode; a backbone starts in train mode like any freshly built module,
    # so that training (which Lightning leaves in the modes it finds) runs with the model's dropout
    return model.train()


def _has_cls(vision_config: Any) -> bool:
    return vision_config.model_type.startswith("clip")


# ---------------------------------------------------------------------------- llava-hf out
def _plain_language_model(model: MultimodalLM) -> PreTrainedModel:
    ops = [entry["op"] for entry in model.surgery]
    if ops:
        raise NotExportable(
            f"the LLM carries surgery {ops}: it is no plain transformers model. Fold plain LoRA in first "
            "(merge_lora, `--merge-lora`); a sparse LLM goes through formats.to_hf_causal_lm, passed as "
            "`language_model`"
        )
    return model.llm


def to_llava_hf(model: MultimodalLM, language_model: PreTrainedModel | None = None) -> LlavaForConditionalGeneration:
    """`model` as a `LlavaForConditionalGeneration` sharing its modules (no copy).

    `language_model`: the LLM as a plain transformers causal LM; default `model.llm` when no surgery
    rewrote it (a converted MoE LLM comes from `hf_causal_lm.to_hf_causal_lm`).
    """
    if set(model.encoders) != {"image"}:
        raise NotExportable(f"LlavaForConditionalGeneration has one image encoder; this model has "
                            f"{sorted(model.encoders) or 'none'} (a text-only model exports as AutoModelForCausalLM)")
    if model.connector_kinds["image"] != "mlp2x_gelu":
        raise NotExportable(f"llava-hf's projector is mlp2x_gelu (Linear, GELU, Linear); this model's connector is "
                            f"{model.connector_kinds['image']!r}")
    llm = language_model if language_model is not None else _plain_language_model(model)
    tower = model.encoders["image"]
    has_cls = _has_cls(tower.config)
    if tower.select_strategy == "patch" and has_cls:
        strategy = "default"  # drop CLS
    else:
        strategy = "full"  # keep every token (a tower without CLS has only patches)
    config = LlavaConfig(
        vision_config=tower.config.to_dict(), text_config=llm.config.to_dict(),
        image_token_index=model.placeholder_ids["image"], vision_feature_layer=tower.feature_layer,
        vision_feature_select_strategy=strategy, projector_hidden_act="gelu", multimodal_projector_bias=True,
        image_seq_length=tower.num_patches + (1 if strategy == "full" and has_cls else 0),
        tie_word_embeddings=bool(llm.config.tie_word_embeddings),
    )
    with torch.device("meta"):
        hf = LlavaForConditionalGeneration(config)
    inner = hf.model
    inner.vision_tower = tower.model
    inner.multi_modal_projector.linear_1 = model.connectors["image"][0]
    inner.multi_modal_projector.linear_2 = model.connectors["image"][2]
    inner.language_model = getattr(llm, llm.base_model_prefix)
    hf.lm_head = llm.get_output_embeddings()
    left = [n for n, t in [*hf.named_parameters(), *hf.named_buffers()] if t.is_meta]
    if left:
        raise NotExportable(f"parts of LlavaForConditionalGeneration have no counterpart in the model: {left[:4]}")
    hf.generation_config = llm.generation_config
    return hf.eval()


def image_processor_for(model: MultimodalLM, mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
                        std: tuple[float, float, float] = (0.5, 0.5, 0.5)) -> CLIPImageProcessor:
    """What the data pipeline's default transform (`NormalizeImage`) does: RGB, bicubic resize to the tower's
    size, scale to [0, 1], normalise per channel; no crop."""
    size = model.encoders["image"].config.image_size
    return CLIPImageProcessor(do_resize=True, size={"height": size, "width": size}, resample=3,
                              do_center_crop=False, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                              image_mean=list(mean), image_std=list(std), do_convert_rgb=True)


def export_multimodal(model: MultimodalLM, out: str | Path, tokenizer: PreTrainedTokenizerBase,
                      image_processor: Any | None = None, language_model: PreTrainedModel | None = None) -> Path:
    """Write `model` as a llava-hf directory: config.json, weights, generation config, the tokenizer and a
    `LlavaProcessor` (`image_processor`, default `image_processor_for(model)`). Returns `out`."""
    out = Path(out)
    hf = to_llava_hf(model, language_model)
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != model.placeholder_ids["image"]:
        raise NotExportable(f"the tokenizer maps {IMAGE_TOKEN!r} to {tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)}, "
                            f"the model's image placeholder is {model.placeholder_ids.get('image')}: not the "
                            "tokenizer this model was trained with")
    hf.save_pretrained(out)
    tower = model.encoders["image"]
    processor = LlavaProcessor(
        image_processor=image_processor or image_processor_for(model), tokenizer=tokenizer,
        patch_size=tower.config.patch_size, vision_feature_select_strategy=hf.config.vision_feature_select_strategy,
        chat_template=getattr(tokenizer, "chat_template", None), image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1 if _has_cls(tower.config) else 0,
    )
    processor.save_pretrained(out)
    return out


LLAVA_HF = ModelFormat("llava-hf", "a llava-hf transformers directory (config.json: model_type llava)", is_llava_hf,
                       load_llava_hf)

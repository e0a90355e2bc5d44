"""LLaVA checkpoints in and out: llava-hf and original-LLaVA directories as a `MultimodalLM`, and a
`MultimodalLM` as a llava-hf `LlavaForConditionalGeneration` directory that plain transformers loads.

In (`load_hf_multimodal`, which `load_backbone` calls for a directory with a `config.json`):

- llava-hf (`model_type: llava` with `text_config` / `vision_config`): loaded with transformers'
  own `LlavaForConditionalGeneration.from_pretrained` (so every key layout it reads works), then its
  parts become ours without a copy: the vision tower (`vision_feature_layer`, the select strategy),
  `multi_modal_projector` (linear_1, GELU, linear_2 = our `mlp2x_gelu`), the language model with
  its `lm_head`, and `image_token_index` as the image placeholder id.
- original LLaVA / MoE-LLaVA (`LlavaLlamaForCausalLM` & co.: the LLM's own config plus `mm_*`
  keys; weights `model.*` / `lm_head.*` of the LLM, `model.mm_projector.*`, and, where present,
  `model.vision_tower.vision_tower.*` or MoE-LLaVA's `model.image_tower.image_tower.*`): the LLM
  family comes from the architecture name, the tower's config from `mm_vision_tower` (also its
  weights when the checkpoint does not hold them), the projector from `mm_projector_type`. MoE-LLaVA's
  stage-3 DeepSpeed MoE layers (config `moe`, `mlp.deepspeed_moe.*`) become `SparseMoE`s by the logged
  `upcycle` surgery with each expert's and router's own tensors.
  transformers itself would read such a `config.json` as a default 7B `LlavaConfig` without a word,
  which is why the `mm_*` keys are looked at first.

The tokenizer's image token is mapped, not duplicated: llava-hf tokenizers hold `<image>` at
`image_token_index` (checked); original-LLaVA tokenizers have none (the reference code splices at
id -200), so `load_tokenizer` adds `<image>` once and the embedding grows by that row only.

Out (`to_llava_hf`, `export_multimodal`): config.json (`LlavaConfig` with our vision config, text
config, placeholder id, feature layer and strategy), safetensors weights, the tokenizer, and a
`LlavaProcessor` whose image processor does what the data pipeline's default transform does.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    CLIPImageProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ..paths import model_source_error
from ..safe_load import check_safe_weights, hf_load_kwargs, raise_if_remote_code
from ..tokens import IMAGE_TOKEN, load_tokenizer
from ..layers import SparseMoE
from .architecture import decoder_layers, mlp_attribute
from .connectors import build_connector
from ..modalities.image import VISION_MODELS, VisionTower, build_vision_tower, vision_model_class
from .multimodal import CONFIG_NAME, MultimodalLM
from .upcycle import MoEConfig, upcycle

__all__ = ["HFLayout", "hf_layout", "load_hf_multimodal", "load_llava_hf", "load_original_llava", "to_llava_hf",
           "export_multimodal", "NotExportable"]

HFLayout = Literal["project", "llava-hf", "llava-original", "other"]

# original LLaVA / MoE-LLaVA architecture name (lower case, a part of it) -> transformers model_type of its LLM
ORIGINAL_LLM_FAMILIES = {"llama": "llama", "mistral": "mistral", "stablelm": "stablelm", "phi": "phi",
                         "qwen2": "qwen2", "qwen": "qwen2", "gemma": "gemma"}
# checkpoint key prefix of the vision tower's CLIP/SigLIP model: LLaVA's CLIPVisionTower, MoE-LLaVA's image tower
ORIGINAL_TOWER_PREFIXES = ("model.vision_tower.vision_tower.", "model.image_tower.image_tower.")
# mm_vision_select_feature -> our select strategy
ORIGINAL_SELECT = {"patch": "patch", "cls_patch": "full"}


class NotExportable(ValueError):
    """The model has no export in the requested format: the message says why and what would make it one."""


# ---------------------------------------------------------------------------- which layout is this
def _read_config(directory: Path) -> dict[str, Any]:
    return json.loads((directory / "config.json").read_text())


def hf_layout(directory: str | Path) -> HFLayout:
    """What a local model directory holds: the project's `save_pretrained`, llava-hf, original LLaVA, or else."""
    directory = Path(directory)
    if (directory / CONFIG_NAME).is_file():
        return "project"
    if not (directory / "config.json").is_file():
        return "other"
    config = _read_config(directory)
    if any(k in config for k in ("mm_vision_tower", "mm_image_tower", "mm_projector_type", "mm_hidden_size")):
        return "llava-original"
    if config.get("model_type") == "llava" and "text_config" in config:
        return "llava-hf"
    return "other"


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


def load_hf_multimodal(name_or_path: str | Path, tokenizer: PreTrainedTokenizerBase | None = None,
                       torch_dtype: str | None = None, trust_remote_code: bool = False,
                       allow_unsafe: bool = False) -> MultimodalLM:
    """A llava-hf or original-LLaVA directory (or Hub id) as a `MultimodalLM` (module docstring)."""
    directory = resolve_model_dir(name_or_path, "pretrained backbone")
    layout = hf_layout(directory)
    if layout == "llava-hf":
        return load_llava_hf(directory, tokenizer, torch_dtype, trust_remote_code, allow_unsafe)
    if layout == "llava-original":
        return load_original_llava(directory, tokenizer, torch_dtype, trust_remote_code, allow_unsafe)
    if layout == "project":
        return MultimodalLM.from_pretrained(directory)
    found = _read_config(directory).get("model_type") if (directory / "config.json").is_file() else None
    raise ValueError(
        f"{directory} is not a multimodal checkpoint this project reads: it has no {CONFIG_NAME} (a lightning-moe "
        f"save_pretrained directory), and its config.json (model_type {found!r}) is neither llava-hf "
        "(model_type llava with text_config) nor original LLaVA (mm_* keys). A plain causal LM goes in "
        "backbone.llm (with backbone.vision_tower for the encoder)"
    )


# ---------------------------------------------------------------------------- shared pieces
def _image_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {IMAGE_TOKEN!r} token (load it with lightning_moe.tokens.load_tokenizer)")
    return token_id


def _fit_embeddings(llm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None) -> None:
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


def _finish(llm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None) -> None:
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


def load_llava_hf(directory: str | Path, tokenizer: PreTrainedTokenizerBase | None = None,
                  torch_dtype: str | None = None, trust_remote_code: bool = False,
                  allow_unsafe: bool = False) -> MultimodalLM:
    """A llava-hf `LlavaForConditionalGeneration` directory as a `MultimodalLM` with the same weights."""
    directory = Path(directory)
    check_safe_weights(directory, allow_unsafe=allow_unsafe)
    config = LlavaConfig.from_pretrained(directory)
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"{directory}: vision_feature_layer {layer} (several layers concatenated) is not supported; "
                         "a single layer index is")
    if config.projector_hidden_act != "gelu" or not getattr(config, "multimodal_projector_bias", True):
        raise ValueError(f"{directory}: projector with act {config.projector_hidden_act!r} and bias "
                         f"{getattr(config, 'multimodal_projector_bias', True)} is not LLaVA's mlp2x_gelu")
    image_id = config.image_token_index
    if tokenizer is not None and _image_token_id(tokenizer) != image_id:
        raise ValueError(
            f"{directory}: the checkpoint's image_token_index is {image_id} but the tokenizer maps {IMAGE_TOKEN!r} to "
            f"{_image_token_id(tokenizer)}: use the tokenizer saved with the checkpoint (tokenizer: {directory})"
        )
    dtype = getattr(torch, torch_dtype) if torch_dtype else None
    try:
        hf = LlavaForConditionalGeneration.from_pretrained(directory, dtype=dtype,
                                                           **hf_load_kwargs(trust_remote_code, allow_unsafe))
    except ValueError as error:
        raise_if_remote_code(str(directory), error)
        raise
    inner = hf.model
    tower_model = inner.vision_tower
    if type(tower_model) not in set(VISION_MODELS.values()):
        raise ValueError(f"{directory}: vision tower {type(tower_model).__name__} is not one of "
                         f"{sorted({c.__name__ for c in VISION_MODELS.values()})}")
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
    _fit_embeddings(llm, tokenizer)
    _finish(llm, tokenizer)
    model = MultimodalLM(llm, {"image": tower}, {"image": connector}, {"image": "mlp2x_gelu"}, {"image": image_id})
    # from_pretrained hands back eval mode; a backbone starts in train mode like any freshly built module,
    # so that training (which Lightning leaves in the modes it finds) runs with the model's dropout
    return model.train()


def _has_cls(vision_config: Any) -> bool:
    return vision_config.model_type.startswith("clip")


# ---------------------------------------------------------------------------- original LLaVA in
def _read_safetensors(directory: Path, allow_unsafe: bool) -> dict[str, torch.Tensor]:
    check_safe_weights(directory, allow_unsafe=allow_unsafe)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory} has no .safetensors weights (original LLaVA checkpoints saved as "
                                "pytorch_model*.bin: convert them to safetensors first)")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    return state


def _original_llm_config(directory: Path, config: dict[str, Any]) -> Any:
    arch = " ".join(config.get("architectures") or []).lower()
    family = next((t for key, t in ORIGINAL_LLM_FAMILIES.items() if key in arch), None)
    if family is None:
        raise ValueError(f"{directory}: cannot tell the LLM family of architectures {config.get('architectures')}; "
                         f"known: {sorted(ORIGINAL_LLM_FAMILIES)}")
    fields = {k: v for k, v in config.items()
              if not k.startswith("mm_") and k not in ("model_type", "architectures", "moe", "_name_or_path")}
    return AutoConfig.for_model(family, **fields)


def load_original_llava(directory: str | Path, tokenizer: PreTrainedTokenizerBase | None = None,
                        torch_dtype: str | None = None, trust_remote_code: bool = False,
                        allow_unsafe: bool = False) -> MultimodalLM:
    """An original LLaVA / MoE-LLaVA directory (LLM config + `mm_*` keys) as a `MultimodalLM`."""
    directory = Path(directory)
    config = _read_config(directory)
    if config.get("mm_use_im_start_end"):
        raise ValueError(f"{directory}: mm_use_im_start_end wraps each image in extra tokens; not supported")
    if config.get("mm_patch_merge_type", "flat") != "flat":
        raise ValueError(f"{directory}: mm_patch_merge_type {config['mm_patch_merge_type']!r} (LLaVA-NeXT tiling) "
                         "is not supported; 'flat' is")
    moe = _moe_llava_config(directory, config)
    select = config.get("mm_vision_select_feature", "patch")
    if select not in ORIGINAL_SELECT:
        raise ValueError(f"{directory}: mm_vision_select_feature {select!r}; known {sorted(ORIGINAL_SELECT)}")
    kind = config.get("mm_projector_type", "linear")
    if tokenizer is None:
        if not (directory / "tokenizer_config.json").is_file():
            raise ValueError(f"{directory} has no tokenizer: pass the LLaVA tokenizer (the method's `tokenizer`)")
        tokenizer = load_tokenizer(directory)
    image_id = _image_token_id(tokenizer)

    state = _read_safetensors(directory, allow_unsafe)
    tower_name = config.get("mm_vision_tower") or config.get("mm_image_tower")
    tower_prefix = next((p for p in ORIGINAL_TOWER_PREFIXES if any(k.startswith(p) for k in state)), None)
    feature_layer = int(config.get("mm_vision_select_layer", -2))
    if tower_name is None:
        raise ValueError(f"{directory}: config.json names no vision tower (mm_vision_tower / mm_image_tower)")
    if tower_prefix is None:  # the usual case: LLaVA keeps the tower frozen and does not save it
        tower = build_vision_tower(tower_name, None, feature_layer, trust_remote_code, allow_unsafe)
    else:  # the tower's tensors are in the checkpoint; its shape comes from the named tower's config
        tower_dir = resolve_model_dir(tower_name, "vision tower (mm_vision_tower)")
        vision_config = AutoConfig.from_pretrained(tower_dir)
        vision_config = getattr(vision_config, "vision_config", None) or vision_config
        tower = VisionTower(vision_model_class(vision_config)(vision_config), feature_layer)
        tower_state = {k[len(tower_prefix):]: state.pop(k) for k in list(state) if k.startswith(tower_prefix)}
        tower.model.load_state_dict(tower_state, strict=True)
    tower.select_strategy = ORIGINAL_SELECT[select]

    projector_state = {k[len("model.mm_projector."):]: state.pop(k) for k in list(state)
                       if k.startswith("model.mm_projector.")}
    if not projector_state:
        raise ValueError(f"{directory}: no model.mm_projector.* tensors (a stage-1 projector saved apart, "
                         "mm_projector.bin, is not a whole model)")
    hidden = _original_llm_config(directory, config)
    mm_hidden = int(config.get("mm_hidden_size", tower.hidden_size))
    if mm_hidden != tower.hidden_size:
        raise ValueError(f"{directory}: mm_hidden_size {mm_hidden} but the vision tower {tower_name} has width "
                         f"{tower.hidden_size}")
    connector = build_connector(kind, mm_hidden, hidden.hidden_size)  # unknown kinds: the registry's error
    connector.load_state_dict(projector_state if kind != "linear" else
                              {f"0.{k}": v for k, v in projector_state.items()}, strict=True)

    llm = AutoModelForCausalLM.from_config(hidden)
    experts = _pop_deepspeed_experts(state)
    if bool(experts) != (moe is not None):
        raise ValueError(f"{directory}: config 'moe' (moe_enable) and the DeepSpeed expert tensors disagree: "
                         f"{len(experts)} MoE layers in the weights")
    missing, unexpected = llm.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and hidden.tie_word_embeddings)
               and not any(k.startswith(f"model.layers.{i}.mlp.") for i in experts)]
    if missing or unexpected:
        raise ValueError(f"{directory}: the weights do not match a {type(llm).__name__} of its config: "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    if hidden.tie_word_embeddings:
        llm.tie_weights()
    _fit_embeddings(llm, tokenizer)
    _finish(llm, tokenizer)
    model = MultimodalLM(llm, {"image": tower}, {"image": connector}, {"image": kind}, {"image": image_id})
    if moe is not None:
        _load_moe_llava_experts(directory, model, moe, experts)
    if torch_dtype:
        model.to(getattr(torch, torch_dtype))
    return model


# ---------------------------------------------------------------------------- MoE-LLaVA's DeepSpeed MoE layers
# model.layers.<i>.mlp.deepspeed_moe.gate.wg.weight: the router, Linear(d, E, bias=False);
# model.layers.<i>.mlp.deepspeed_moe.experts.deepspeed_experts.<e>.<the dense MLP's own names>
_DEEPSPEED_KEY = re.compile(r"model\.layers\.(\d+)\.mlp\.deepspeed_moe\.(?:gate\.wg\.weight|experts\.deepspeed_experts\.(\d+)\.(.+))")


def _moe_llava_config(directory: Path, config: dict[str, Any]) -> MoEConfig | None:
    """MoE-LLaVA's `moe` config block as the `upcycle` surgery's config (its layers, experts, top-k)."""
    moe = config.get("moe")
    if not isinstance(moe, dict) or not moe.get("moe_enable"):
        return None
    if moe.get("use_residual"):
        raise ValueError(f"{directory}: MoE-LLaVA's residual MoE (use_residual) is not supported")
    counts = moe.get("num_experts", 4)
    counts = set(counts) if isinstance(counts, list) else {counts}
    if len(counts) != 1:
        raise ValueError(f"{directory}: MoE layers with different expert counts {sorted(counts)} are not supported")
    # dropless, as every sparse layer here by default: the reference drops tokens past capacity (1.5 train,
    # 2.0 eval); set moe capacity factors on a method to train with dropping. Training draws the second
    # expert with Gumbel noise, as DeepSpeed's top-2 gate does.
    return MoEConfig(num_experts=counts.pop(), top_k=int(moe.get("top_k_experts", 2)),
                     layers=[int(i) for i in moe["moe_layers_idx"]], noisy_second_choice=True)


def _pop_deepspeed_experts(state: dict[str, torch.Tensor]) -> dict[int, dict[str, Any]]:
    """Take the DeepSpeed MoE tensors out of `state`: layer -> {"router": W, "experts": {e: {name: tensor}}}."""
    layers: dict[int, dict[str, Any]] = {}
    for key in list(state):
        found = _DEEPSPEED_KEY.fullmatch(key)
        if found is None:
            continue
        layer = layers.setdefault(int(found.group(1)), {"router": None, "experts": {}})
        if found.group(2) is None:
            layer["router"] = state.pop(key)
        else:
            layer["experts"].setdefault(int(found.group(2)), {})[found.group(3)] = state.pop(key)
    return layers


def _load_moe_llava_experts(directory: Path, model: MultimodalLM, config: MoEConfig,
                            layers: dict[int, dict[str, Any]]) -> None:
    """Upcycle the recorded layers (logged, so save_pretrained replays it), then put each expert's and each
    router's own tensors in place of the copies."""
    if sorted(layers) != sorted(config.layers):
        raise ValueError(f"{directory}: moe_layers_idx {config.layers} but expert tensors for layers {sorted(layers)}")
    decoder = decoder_layers(model.llm)
    for i, found in layers.items():
        # the dense MLP takes expert 0's tensors first: upcycling needs a filled MLP of the right layout
        getattr(decoder[i], mlp_attribute(decoder[i])).load_state_dict(found["experts"][0], strict=True)
    upcycle(model, config)
    with torch.no_grad():
        for i, found in layers.items():
            moe = getattr(decoder[i], mlp_attribute(decoder[i]))
            if sorted(found["experts"]) != list(range(moe.num_experts)) or found["router"] is None:
                raise ValueError(f"{directory}: MoE layer {i} has experts {sorted(found['experts'])} and "
                                 f"{'a' if found['router'] is not None else 'no'} router; expected "
                                 f"{moe.num_experts} experts and a router")
            moe.router.proj.weight.copy_(found["router"].float())
            for e, tensors in found["experts"].items():
                expert = SparseMoE.from_dense(_dense_twin(model, i, tensors), 1, 1)
                moe.w_in[e].copy_(expert.w_in[0])
                moe.down_proj[e].copy_(expert.down_proj[0])
                if moe.b_in is not None:
                    moe.b_in[e].copy_(expert.b_in[0])
                    moe.down_bias[e].copy_(expert.down_bias[0])


def _dense_twin(model: MultimodalLM, layer: int, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A dense MLP of the LLM's family holding one expert's tensors."""
    config = model.llm.config
    with torch.device("meta"):
        twin = AutoModelForCausalLM.from_config(config)
    mlp = getattr(decoder_layers(twin)[layer], mlp_attribute(decoder_layers(twin)[layer]))
    mlp.load_state_dict(tensors, strict=True, assign=True)
    return mlp


# ---------------------------------------------------------------------------- llava-hf out
def _plain_language_model(model: MultimodalLM) -> PreTrainedModel:
    ops = [entry["op"] for entry in model.surgery]
    if ops:
        raise NotExportable(
            f"the LLM carries surgery {ops}: it is no plain transformers model. Fold plain LoRA in first "
            "(merge_lora, `--merge-lora`); a sparse LLM goes through models.to_hf_causal_lm, passed as "
            "`language_model`"
        )
    return model.llm


def to_llava_hf(model: MultimodalLM, language_model: PreTrainedModel | None = None) -> LlavaForConditionalGeneration:
    """`model` as a `LlavaForConditionalGeneration` sharing its modules (no copy).

    `language_model`: the LLM as a plain transformers causal LM; default `model.llm` when no surgery
    rewrote it (a converted MoE LLM comes from `to_hf_causal_lm`).
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


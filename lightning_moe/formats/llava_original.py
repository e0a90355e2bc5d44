"""Original LLaVA / MoE-LLaVA directories in (`LlavaLlamaForCausalLM` & co.), as a `MultimodalLM`.

Detected by its `config.json`: the LLM's own config plus `mm_*` keys. transformers itself would read
such a config as a default 7B `LlavaConfig` without a word, which is why the `mm_*` keys are looked
at before anything else.

Weights: `model.*` / `lm_head.*` of the LLM, `model.mm_projector.*`, and, where present,
`model.vision_tower.vision_tower.*` or MoE-LLaVA's `model.image_tower.image_tower.*`. The LLM family
comes from the architecture name, the tower's config from `mm_vision_tower` (also its weights when
the checkpoint does not hold them), the projector from `mm_projector_type`. MoE-LLaVA's stage-3
DeepSpeed MoE layers (config `moe`, `mlp.deepspeed_moe.*`) become `SparseMoE`s by the logged `upcycle`
surgery with each expert's and router's own tensors.

Original-LLaVA tokenizers have no `<image>` (the reference code splices at id -200), so
`load_tokenizer` adds it once and the embedding grows by that row only.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerBase

from ..layers import SparseMoE
from ..models.architecture import decoder_layers, mlp_attribute
from ..models.connectors import build_connector
from ..modalities.image import VisionTower, build_vision_tower, vision_config_to_vision_only, vision_model_class
from ..models.multimodal import MultimodalLM
from ..models.upcycle import MoEConfig, upcycle
from ..safe_load import check_safe_weights
from ..tokens import load_tokenizer
from .base import ORIGINAL_LLAVA_KEYS, ModelFormat, read_json_config, resolve_model_dir
from .llava_hf import finish_generation, fit_embeddings, image_token_id

__all__ = ["LLAVA_ORIGINAL", "is_original_llava", "load_original_llava"]

# original LLaVA / MoE-LLaVA architecture name (lower case, a part of it) -> transformers model_type of its LLM
ORIGINAL_LLM_FAMILIES = {"llama": "llama", "mistral": "mistral", "stablelm": "stablelm", "phi": "phi",
                         "qwen2": "qwen2", "qwen": "qwen2", "gemma": "gemma"}
# checkpoint key prefix of the vision tower's CLIP/SigLIP model: LLaVA's CLIPVisionTower, MoE-LLaVA's image tower
ORIGINAL_TOWER_PREFIXES = ("model.vision_tower.vision_tower.", "model.image_tower.image_tower.")
# mm_vision_select_feature -> our select strategy
ORIGINAL_SELECT = {"patch": "patch", "cls_patch": "full"}


def is_original_llava(path: Path) -> bool:
    config = read_json_config(path / "config.json")
    return config is not None and any(k in config for k in ORIGINAL_LLAVA_KEYS)


# ---------------------------------------------------------------------------- in
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


def load_original_llava(directory: str | Path, *, tokenizer: PreTrainedTokenizerBase | None = None,
                        torch_dtype: str | None = None, trust_remote_code: bool = False,
                        allow_unsafe: bool = False) -> MultimodalLM:
    """An original LLaVA / MoE-LLaVA directory (LLM config + `mm_*` keys) as a `MultimodalLM`."""
    directory = Path(directory)
    config = read_json_config(directory / "config.json")
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
    image_id = image_token_id(tokenizer)

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
        vision_config = vision_config_to_vision_only(AutoConfig.from_pretrained(tower_dir))
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
    fit_embeddings(llm, tokenizer)
    finish_generation(llm, tokenizer)
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


LLAVA_ORIGINAL = ModelFormat("llava-original",
                             "an original LLaVA / MoE-LLaVA directory (config.json with mm_* keys)",
                             is_original_llava, load_original_llava)

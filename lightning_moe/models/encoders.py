"""Modality encoders: Hugging Face vision towers (CLIP, SigLIP) wrapped to return patch features.

`VisionTower` picks the hidden layer LLaVA uses (the penultimate by default) and drops the CLS
token where the tower has one, so every image becomes (num_patches, hidden) features.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import AutoConfig, CLIPVisionModel, PretrainedConfig, SiglipVisionModel

from ..paths import could_be_hub_id, model_source_error
from ..safe_load import check_safe_weights, raise_if_remote_code, hf_load_kwargs
from .presets import VISION_PRESETS, preset_config

# model_type of a (full or vision-only) checkpoint -> vision model class
VISION_MODELS = {
    "clip": CLIPVisionModel,
    "clip_vision_model": CLIPVisionModel,
    "siglip": SiglipVisionModel,
    "siglip_vision_model": SiglipVisionModel,
}


SelectStrategy = Literal["patch", "full"]


class VisionTower(nn.Module):
    """(images, 3, H, W) -> (images, num_patches, hidden) from hidden layer `feature_layer`.

    `select_strategy`: "patch" drops the CLS token where the tower has one (LLaVA's default), "full" keeps
    every token (llava-hf's "full", original LLaVA's "cls_patch").
    """

    def __init__(self, model: nn.Module, feature_layer: int = -2, select_strategy: SelectStrategy = "patch"):
        super().__init__()
        self.model = model
        self.feature_layer = feature_layer
        self.select_strategy = select_strategy
        cfg = model.config
        self.num_patches = (cfg.image_size // cfg.patch_size) ** 2
        self.hidden_size = cfg.hidden_size

    @property
    def config(self) -> PretrainedConfig:
        return self.model.config

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        out = self.model(pixel_values.to(dtype), output_hidden_states=True)
        features = out.hidden_states[self.feature_layer]
        if self.select_strategy == "patch" and features.shape[1] == self.num_patches + 1:  # CLIP prepends a CLS token; LLaVA drops it
            features = features[:, 1:]
        return features


def vision_model_class(config: PretrainedConfig) -> type:
    if config.model_type not in VISION_MODELS:
        raise ValueError(f"unsupported vision tower type {config.model_type!r}; known: {sorted(VISION_MODELS)}")
    return VISION_MODELS[config.model_type]


def vision_config_to_vision_only(config: PretrainedConfig) -> PretrainedConfig:
    """A full CLIP/SigLIP config holds the tower's config under `vision_config`."""
    return getattr(config, "vision_config", None) or config


def build_vision_tower(name_or_path: str, overrides: dict[str, Any] | None = None, feature_layer: int = -2,
                       trust_remote_code: bool = False, allow_unsafe: bool = False) -> VisionTower:
    """A preset name builds a fresh tiny tower; anything else is loaded with `from_pretrained` (safetensors
    only and no repository code, unless `allow_unsafe` / `trust_remote_code` say otherwise)."""
    if name_or_path in VISION_PRESETS:
        config = preset_config(VISION_PRESETS, name_or_path, overrides)
        return VisionTower(vision_model_class(config)(config), feature_layer)
    check_safe_weights(name_or_path, allow_unsafe=allow_unsafe)
    if not Path(name_or_path).exists() and not could_be_hub_id(name_or_path):
        raise model_source_error("vision tower", name_or_path)
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except ValueError as error:
        raise_if_remote_code(name_or_path, error)
        raise
    except OSError as error:
        if Path(name_or_path).exists():
            raise
        raise model_source_error("vision tower", name_or_path, error) from error
    model = vision_model_class(config).from_pretrained(
        name_or_path, **hf_load_kwargs(trust_remote_code, allow_unsafe), **(overrides or {}))
    return VisionTower(model, feature_layer)


def vision_tower_from_config(config_dict: dict[str, Any], feature_layer: int,
                             select_strategy: SelectStrategy = "patch") -> VisionTower:
    config = AutoConfig.for_model(**config_dict)
    config = vision_config_to_vision_only(config)
    return VisionTower(vision_model_class(config)(config), feature_layer, select_strategy)

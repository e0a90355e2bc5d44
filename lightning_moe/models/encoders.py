"""Modality encoders: Hugging Face vision towers (CLIP, SigLIP) and the Whisper speech encoder,
wrapped to return a sequence of features per item.

`VisionTower` picks the hidden layer LLaVA uses (the penultimate by default) and drops the CLS
token where the tower has one, so every image becomes (num_patches, hidden) features. Video has no
tower of its own: its frames go through the image tower (`MultimodalLM`, Uni-MoE's reference).
`AudioTower` runs a Whisper encoder on one log-mel window per row, (n, n_mels, frames) ->
(n, frames // 2, hidden) (Whisper's two convolutions halve the frames), from its last layer as
Uni-MoE's reference reads it.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn
from transformers import AutoConfig, CLIPVisionModel, PretrainedConfig, SiglipVisionModel, WhisperConfig, WhisperModel
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from ..safe_load import hf_load_kwargs, hf_source
from .presets import AUDIO_PRESETS, VISION_PRESETS, preset_config

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
        for module in self.unused_modules():
            _parameters_to_buffers(module)

    @property
    def config(self) -> PretrainedConfig:
        return self.model.config

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        features = self.hidden_state(pixel_values.to(dtype))
        if self.select_strategy == "patch" and features.shape[1] == self.num_patches + 1:  # CLIP prepends a CLS token; LLaVA drops it
            features = features[:, 1:]
        return features


    def unused_modules(self) -> list[nn.Module]:
        """Parts of the tower the features never depend on: its pooling (CLIP's and SigLIP's `post_layernorm`,
        SigLIP's `head`) and the layers after `feature_layer`. Their weights are kept as buffers, so checkpoints
        and Hugging Face exports keep every tensor, but they are not parameters: no freeze plan can make them
        trainable, and DDP does not wait for gradients they never get."""
        layers = getattr(getattr(self.model, "encoder", None), "layers", None)
        if not hasattr(self.model, "embeddings") or layers is None:
            return []
        count = len(layers) + 1
        after = list(layers[self.feature_layer % count:]) if -count <= self.feature_layer < count else []
        pooling = [getattr(self.model, name) for name in ("post_layernorm", "head") if hasattr(self.model, name)]
        return [m for m in pooling if isinstance(m, nn.Module)] + after

    def hidden_state(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`model(pixel_values, output_hidden_states=True).hidden_states[feature_layer]`, running only the layers
        it needs: the tower's pooling (CLIP's `post_layernorm`, SigLIP's `post_layernorm` and `head`) and the layers
        after `feature_layer` never touch the features, and parameters that get no gradient make DDP fail."""
        model = self.model
        layers = getattr(getattr(model, "encoder", None), "layers", None)
        if not hasattr(model, "embeddings") or layers is None:  # another tower layout: the generic path
            return model(pixel_values, output_hidden_states=True).hidden_states[self.feature_layer]
        count = len(layers) + 1  # hidden_states: the embeddings' output, then one per layer
        if not -count <= self.feature_layer < count:
            raise IndexError(f"vision_feature_layer {self.feature_layer} is out of range for a {len(layers)}-layer tower")
        hidden = model.embeddings(pixel_values)
        if hasattr(model, "pre_layrnorm"):  # CLIP normalises before the encoder (hidden_states[0] includes it)
            hidden = model.pre_layrnorm(hidden)
        for layer in layers[: self.feature_layer % count]:
            hidden = layer(hidden, None)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden  # older transformers return tuples
        return hidden


def _parameters_to_buffers(module: nn.Module) -> None:
    """Turn every parameter of `module` into a persistent buffer of the same name (same state_dict keys)."""
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            delattr(sub, name)
            sub.register_buffer(name, param.detach())


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
    with hf_source("vision tower", name_or_path, allow_unsafe):
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    model = vision_model_class(config).from_pretrained(
        name_or_path, **hf_load_kwargs(trust_remote_code, allow_unsafe), **(overrides or {}))
    return VisionTower(model, feature_layer)


def vision_tower_from_config(config_dict: dict[str, Any], feature_layer: int,
                             select_strategy: SelectStrategy = "patch") -> VisionTower:
    config = AutoConfig.for_model(**config_dict)
    config = vision_config_to_vision_only(config)
    return VisionTower(vision_model_class(config)(config), feature_layer, select_strategy)


# ---------------------------------------------------------------------------- audio
class AudioTower(nn.Module):
    """(windows, n_mels, frames) Whisper log-mel -> (windows, frames // 2, hidden) from the encoder's last layer."""

    def __init__(self, encoder: WhisperEncoder):
        super().__init__()
        self.model = encoder
        cfg = encoder.config
        self.num_positions = cfg.max_source_positions  # features per window
        self.hidden_size = cfg.d_model
        self.feature_layer = -1  # recorded for the model config; Whisper's reference reads the last layer

    @property
    def config(self) -> PretrainedConfig:
        return self.model.config

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        return self.model(input_features.to(dtype)).last_hidden_state


def build_audio_tower(name_or_path: str, overrides: dict[str, Any] | None = None, trust_remote_code: bool = False,
                      allow_unsafe: bool = False) -> AudioTower:
    """A preset name builds a fresh tiny Whisper encoder; anything else (an `openai/whisper-*` name or a local
    directory) loads a Whisper checkpoint and keeps its encoder (safetensors only, no repository code, unless
    `allow_unsafe` / `trust_remote_code` say otherwise)."""
    if name_or_path in AUDIO_PRESETS:
        return AudioTower(WhisperEncoder(preset_config(AUDIO_PRESETS, name_or_path, overrides)))
    with hf_source("audio tower", name_or_path, allow_unsafe):
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if not isinstance(config, WhisperConfig):
        raise ValueError(f"audio tower {name_or_path!r} is a {config.model_type!r} checkpoint; a Whisper one is needed")
    # the full encoder-decoder loads, the decoder is dropped: Whisper checkpoints keep the encoder under `model.encoder`
    whisper = WhisperModel.from_pretrained(name_or_path, **hf_load_kwargs(trust_remote_code, allow_unsafe),
                                           **(overrides or {}))
    return AudioTower(whisper.get_encoder())


def audio_tower_from_config(config_dict: dict[str, Any]) -> AudioTower:
    return AudioTower(WhisperEncoder(AutoConfig.for_model(**config_dict)))

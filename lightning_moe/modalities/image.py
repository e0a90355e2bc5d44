"""The image modality: `<image>`, one image file per placeholder, read with Pillow, through a CLIP / SigLIP tower.

Batch: `pixel_values` (n_image, 3, H, W) float32 through the image transform (`NormalizeImage`, or a Hugging
Face image processor), `image_counts` (B,). `VisionTower` picks the hidden layer LLaVA uses (the penultimate by
default) and drops the CLS token where the tower has one, so every image becomes (num_patches, hidden) features.
Video frames go through this transform and this tower too (`video.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import nn
import transformers
from transformers import AutoConfig, CLIPVisionConfig, PretrainedConfig, SiglipVisionConfig

from ..safe_load import hf_load_kwargs, hf_source
from .registry import ModalitySpec, Tower, from_pretrained_overrides, preset_config, register_modality

IMAGE_TOKEN = "<image>"

ImageTransform = Callable[[Image.Image], torch.Tensor]  # PIL image -> (3, H, W) float


class NormalizeImage:
    """RGB, resize to `size` x `size` (bicubic) if needed, scale to [0, 1], normalise per channel."""

    def __init__(self, size: int = 32, mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5)):
        self.size = size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)
        return (pixels - self.mean) / self.std


class HFImageProcessor:
    """A Hugging Face image processor (e.g. a CLIP checkpoint's) as an `ImageTransform`."""

    def __init__(self, name_or_path: str):
        from transformers import AutoImageProcessor  # only needed for real checkpoints

        # never the repository's own Python code (safe_load.py)
        self.processor = AutoImageProcessor.from_pretrained(name_or_path, trust_remote_code=False)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]


def image_transform(options: Mapping[str, Any], built: Mapping[str, Any] | None = None) -> ImageTransform:
    """`processor` (a Hugging Face image processor name/path) or `NormalizeImage(size, mean, std)`."""
    options = dict(options)
    processor = options.pop("processor", None)
    return HFImageProcessor(processor) if processor else NormalizeImage(**options)


def decode_image(file: Path) -> None:
    """Decode every pixel of an image (`load()`, not `verify()`, which decodes none), raising one of the decode
    errors if damaged."""
    with Image.open(file) as image:
        image.load()


def load_image(file: Path, transform: ImageTransform) -> torch.Tensor:
    with Image.open(file) as image:
        return transform(image)


# ---------------------------------------------------------------------------- the tower
# model_type of a (full or vision-only) checkpoint -> the name of its vision model class in transformers: a name, so
# that importing the registry (the tokenizer and the data side do) does not load the modeling code
VISION_MODELS = {
    "clip": "CLIPVisionModel",
    "clip_vision_model": "CLIPVisionModel",
    "siglip": "SiglipVisionModel",
    "siglip_vision_model": "SiglipVisionModel",
}

VISION_PRESETS: dict[str, tuple[Callable[..., PretrainedConfig], dict[str, Any]]] = {
    "tiny-clip": (
        CLIPVisionConfig,
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             image_size=32, patch_size=8),
    ),
    "tiny-siglip": (
        SiglipVisionConfig,
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             image_size=32, patch_size=8),
    ),
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
    return getattr(transformers, VISION_MODELS[config.model_type])


def vision_config_to_vision_only(config: PretrainedConfig) -> PretrainedConfig:
    """A full CLIP/SigLIP config holds the tower's config under `vision_config`."""
    return getattr(config, "vision_config", None) or config


def build_vision_tower(name_or_path: str, overrides: dict[str, Any] | None = None, feature_layer: int = -2,
                       trust_remote_code: bool = False, allow_unsafe: bool = False) -> VisionTower:
    """A preset name builds a fresh tiny tower; anything else is loaded with `from_pretrained` (safetensors
    only and no repository code, unless `allow_unsafe` / `trust_remote_code` say otherwise)."""
    if name_or_path in VISION_PRESETS:
        config = preset_config(VISION_PRESETS, name_or_path, overrides, "vision tower overrides")
        return VisionTower(vision_model_class(config)(config), feature_layer)
    with hf_source("vision tower", name_or_path, allow_unsafe, trust_remote_code):
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    with from_pretrained_overrides(config, overrides, f"vision tower overrides of {name_or_path}"):
        model = vision_model_class(config).from_pretrained(
            name_or_path, **hf_load_kwargs(trust_remote_code, allow_unsafe), **(overrides or {}))
    return VisionTower(model, feature_layer)


def vision_tower_from_config(config_dict: dict[str, Any], feature_layer: int,
                             select_strategy: SelectStrategy = "patch") -> VisionTower:
    config = AutoConfig.for_model(**config_dict)
    config = vision_config_to_vision_only(config)
    return VisionTower(vision_model_class(config)(config), feature_layer, select_strategy)


def vision_record(tower: VisionTower) -> dict[str, Any]:
    """The tower's entry of `multimodal_config.json`: its config and feature layer (and a non-default select
    strategy; records without it read as "patch")."""
    record = {"kind": "vision", "config": tower.config.to_dict(), "feature_layer": tower.feature_layer}
    if tower.select_strategy != "patch":
        record["select_strategy"] = tower.select_strategy
    return record


def vision_tower_from_record(record: dict[str, Any]) -> VisionTower:
    return vision_tower_from_config(record["config"], record["feature_layer"], record.get("select_strategy", "patch"))


VISION = Tower(build=build_vision_tower, to_config=vision_record, from_config=vision_tower_from_record)

IMAGE = register_modality(ModalitySpec(
    name="image", placeholder=IMAGE_TOKEN, decode=decode_image, load=load_image, transform=image_transform,
    tower=VISION, connector="mlp2x_gelu", feature_layer=-2, values_key="pixel_values",
    transform_options=lambda tower: {"size": tower.config.image_size},
))

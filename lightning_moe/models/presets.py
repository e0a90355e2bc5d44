"""Tiny model presets: small Hugging Face configs that the tests and the quickstart build from
scratch (no hub access needed). A preset name can stand wherever a checkpoint name or path is
accepted; `overrides` change single fields (e.g. ``{"num_hidden_layers": 4}``).
"""

from __future__ import annotations

from typing import Any, Callable

from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    MixtralConfig,
    PhiConfig,
    PretrainedConfig,
    SiglipVisionConfig,
)

# name -> (config class, default fields). Calibrated on a 2-core CPU (DESIGN.md, Data).
LLM_PRESETS: dict[str, tuple[Callable[..., PretrainedConfig], dict[str, Any]]] = {
    "tiny-llama": (
        LlamaConfig,
        dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True),
    ),
    # fc1/act/fc2 MLPs (Phi): upcycling must work for both MLP layouts.
    "tiny-phi": (
        PhiConfig,
        dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=512, tie_word_embeddings=False),
    ),
    # An already-sparse family, for loading Mixtral-style checkpoints.
    "tiny-mixtral": (
        MixtralConfig,
        dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
             max_position_embeddings=512, tie_word_embeddings=True),
    ),
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


def preset_config(registry: dict, name: str, overrides: dict[str, Any] | None = None) -> PretrainedConfig:
    config_cls, defaults = registry[name]
    return config_cls(**{**defaults, **(overrides or {})})

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
    WhisperConfig,
)

# name -> (config class, default fields). Sized to learn the shipped shapes data in minutes on a 2-core CPU
# (docs/quickstart.md, "Why these training settings").
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


# Whisper encoders. The window is short so that a CPU trains in minutes: max_source_positions=50 reads
# 100 log-mel frames, 1 s at Whisper's 10 ms hop (the data side's `audio_chunk_seconds: 1.0`); real
# Whisper reads 30 s (1500 positions). Only the encoder is built (`encoders.AudioTower`).
AUDIO_PRESETS: dict[str, tuple[Callable[..., PretrainedConfig], dict[str, Any]]] = {
    "tiny-whisper": (
        WhisperConfig,
        dict(num_mel_bins=80, d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
             decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=128, max_source_positions=50,
             max_target_positions=32),
    ),
}


def preset_config(registry: dict, name: str, overrides: dict[str, Any] | None = None) -> PretrainedConfig:
    config_cls, defaults = registry[name]
    return config_cls(**{**defaults, **(overrides or {})})

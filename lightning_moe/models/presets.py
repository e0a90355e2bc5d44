"""Tiny LLM presets: small Hugging Face configs that the tests and the quickstart build from
scratch (no hub access needed). A preset name can stand wherever a checkpoint name or path is
accepted; `overrides` change single fields (e.g. ``{"num_hidden_layers": 4}``,
`lightning_moe.modalities.preset_config`, which refuses a key the config has no field of). The encoder towers' presets are their modality's
(`lightning_moe/modalities/`: `tiny-clip`, `tiny-siglip`, `tiny-whisper`).
"""

from __future__ import annotations

from typing import Any, Callable

from transformers import LlamaConfig, MixtralConfig, PhiConfig, PretrainedConfig

__all__ = ["LLM_PRESETS"]

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

"""Plain nn.Modules composed over transformers: `MultimodalLM`, tiny presets, surgery."""

from .multimodal import MultimodalLM, MultimodalOutput, build_llm, build_multimodal
from .surgery import (MoEConfig, ParameterCounts, decoder_layers, is_sparse, parameter_counts, routed_layers,
                      set_trainable, upcycle)

__all__ = ["MultimodalLM", "MultimodalOutput", "build_llm", "build_multimodal", "MoEConfig", "decoder_layers",
           "is_sparse", "routed_layers", "set_trainable", "upcycle", "ParameterCounts", "parameter_counts"]

"""Plain nn.Modules composed over transformers: `MultimodalLM`, tiny presets, surgery."""

from .multimodal import MultimodalLM, MultimodalOutput, build_llm, build_multimodal
from .surgery import (
    AdapterConfig,
    MoEConfig,
    ParameterCounts,
    add_adapters,
    add_mora_task,
    decoder_layers,
    is_sparse,
    load_adapters,
    merge_lora,
    parameter_counts,
    plan_adapters,
    routed_layers,
    save_adapters,
    set_trainable,
    upcycle,
)

__all__ = ["MultimodalLM", "MultimodalOutput", "build_llm", "build_multimodal", "MoEConfig", "decoder_layers",
           "is_sparse", "routed_layers", "set_trainable", "upcycle", "AdapterConfig", "add_adapters", "add_mora_task",
           "plan_adapters", "save_adapters", "load_adapters", "merge_lora", "ParameterCounts", "parameter_counts"]

"""Plain nn.Modules composed over transformers: `MultimodalLM`, tiny presets, and surgery, by job:

- `multimodal.py`: `MultimodalLM` (which saves and reads its own `save_pretrained` directory), `build_llm`,
  `build_multimodal`
- `architecture.py`: where an LLM family keeps its decoder layers and MLPs; the module finders
- `upcycle.py`: dense MLPs -> `SparseMoE`, parameter counts
- `native_moe.py`: Hugging Face MoE blocks (Mixtral, Qwen-MoE, OLMoE) -> `SparseMoE`
- `adapters.py`: adapter rules, planned, added, saved, loaded and merged through the kind registry
- `freeze.py`: parameter groups and `set_trainable`
- `checkpoint.py`: the surgery log (`register_surgery`, `replay_surgery`)
- `modality_experts.py`: Uni-MoE's upcycling, each expert from its own modality's trained FFN
Importing this package registers the shipped surgeries (upcycle, native_moe, adapters, mora_add_task,
modality_experts). Other model formats on disk (llava-hf, original LLaVA, peft, transformers causal LMs,
Lightning checkpoints) are read and written by `lightning_moe.formats`, which this package never imports.
"""

from .architecture import adapter_modules, decoder_layers, expert_layers, mlp_attribute, resolve_layers, routed_layers
from .checkpoint import SURGERIES, canonical_log, register_surgery, replay_surgery
from .multimodal import MultimodalLM, MultimodalOutput, build_llm, build_multimodal
from .native_moe import convert_native_moe
from .upcycle import MoEConfig, ParameterCounts, is_sparse, parameter_counts, upcycle
from .adapters import (
    AdapterConfig,
    AdapterRule,
    adapter_parameters,
    add_adapters,
    add_mora_task,
    load_adapters,
    merge_lora,
    plan_adapters,
    save_adapters,
)
from .freeze import PARAMETER_GROUPS, set_trainable
from .modality_experts import ModalityExpertsConfig, modality_experts

__all__ = ["MultimodalLM", "MultimodalOutput", "build_llm", "build_multimodal", "MoEConfig",
           "decoder_layers", "mlp_attribute", "resolve_layers", "is_sparse", "routed_layers", "expert_layers",
           "adapter_modules", "set_trainable", "PARAMETER_GROUPS", "upcycle", "AdapterConfig", "AdapterRule",
           "add_adapters", "add_mora_task", "adapter_parameters", "plan_adapters", "save_adapters", "load_adapters",
           "merge_lora", "ParameterCounts", "parameter_counts", "SURGERIES", "register_surgery", "replay_surgery",
           "canonical_log", "convert_native_moe", "ModalityExpertsConfig", "modality_experts"]

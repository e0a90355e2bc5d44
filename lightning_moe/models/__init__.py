"""Plain nn.Modules composed over transformers: `MultimodalLM`, tiny presets, and surgery, by job:

- `multimodal.py`: `MultimodalLM` (which saves and reads its own `save_pretrained` directory), `build_llm`,
  `build_multimodal`
- `architecture.py`: where an LLM family keeps its decoder layers and MLPs; the module finders
- `upcycle.py`: dense MLPs -> `SparseMoE`, parameter counts
- `native_moe.py`: Hugging Face MoE blocks (Mixtral, Qwen-MoE, OLMoE) -> `SparseMoE`
- `adapters.py`: adapter rules, planned, added, saved, loaded and merged through the kind registry
- `freeze.py`: parameter groups (`mlp_parameters` among them) and `set_trainable`
- `checkpoint.py`: the surgery log (`register_surgery`, `replay_surgery`)
- `meta.py`: building a model without initialising the weights a load fills next (`parameters_on_meta`, `materialize`)
Importing this package registers the shipped surgeries (upcycle, native_moe, adapters, add_adapter_task) and
reads the records older code wrote (`checkpoint.register_old_op`). Other model formats on disk (llava-hf,
original LLaVA, peft, transformers causal LMs, Lightning checkpoints) are read and written by
`lightning_moe.formats`, which this package never imports.
"""

from .architecture import adapter_modules, decoder_layers, expert_layers, mlp_attribute, resolve_layers, routed_layers
from .checkpoint import SURGERIES, canonical_log, register_old_op, register_surgery, replay_surgery
from .multimodal import MultimodalLM, MultimodalOutput, build_llm, build_multimodal
from .native_moe import convert_native_moe
from .upcycle import MoEConfig, ParameterCounts, is_sparse, parameter_counts, upcycle
from .adapters import (
    AdapterRule,
    adapter_parameters,
    add_adapter_task,
    add_adapters,
    load_adapters,
    merge_lora,
    plan_adapters,
    save_adapters,
)
from .freeze import PARAMETER_GROUPS, ParameterGroup, mlp_parameters, set_trainable

__all__ = ["MultimodalLM", "MultimodalOutput", "build_llm", "build_multimodal", "MoEConfig",
           "decoder_layers", "mlp_attribute", "resolve_layers", "is_sparse", "routed_layers", "expert_layers",
           "adapter_modules", "set_trainable", "PARAMETER_GROUPS", "ParameterGroup", "mlp_parameters", "upcycle",
           "AdapterRule", "add_adapters", "add_adapter_task", "adapter_parameters", "plan_adapters", "save_adapters",
           "load_adapters", "merge_lora", "ParameterCounts", "parameter_counts", "SURGERIES", "register_surgery",
           "register_old_op", "replay_surgery", "canonical_log", "convert_native_moe"]

"""Pure-torch sparse layers: routers and routing losses, `SparseMoE`, adapter kinds (LoRA / MoLE /
MoRA, one file each under `adapters/`, and their registry).

Imports only torch, so every layer is usable on its own; `models/` (upcycle.py, adapters.py) puts
them into Hugging Face models.
"""

from .grouped import grouped_linear, grouped_mm_supported
from .adapters import (
    AdapterKind,
    LoRAConfig,
    LoRALinear,
    MoLEConfig,
    MoLEMLP,
    MoRAConfig,
    MoRALinear,
    adapter_kind,
    adapter_kinds,
    register_adapter_kind,
)
from .mlp import MLPLayout, mlp_layout
from .moe import SparseMoE, get_activation
from .routing import (
    BalanceForm,
    RoutedLayer,
    RouterOutput,
    TopKRouter,
    capacity_drop,
    collect_routing,
    expert_capacity,
    load_balancing_loss,
    register_balance_form,
    router_z_loss,
)

__all__ = [
    "RouterOutput",
    "TopKRouter",
    "RoutedLayer",
    "collect_routing",
    "load_balancing_loss",
    "BalanceForm",
    "register_balance_form",
    "router_z_loss",
    "expert_capacity",
    "capacity_drop",
    "SparseMoE",
    "get_activation",
    "LoRALinear",
    "MoLEMLP",
    "MoRALinear",
    "LoRAConfig",
    "MoLEConfig",
    "MoRAConfig",
    "AdapterKind",
    "register_adapter_kind",
    "adapter_kind",
    "adapter_kinds",
    "MLPLayout",
    "mlp_layout",
    "grouped_linear",
    "grouped_mm_supported",
]

"""Pure-torch sparse layers: routers and routing losses, `SparseMoE`, LoRA / MoLE / MoRA adapters.

Imports only torch, so every layer is usable on its own; `models/surgery.py` puts them into
Hugging Face models.
"""

from .grouped import grouped_linear, grouped_mm_supported
from .lora import LoRALinear, MoLEMLP, MoRALinear
from .moe import SparseMoE, get_activation
from .routing import (
    RoutedLayer,
    RouterOutput,
    TopKRouter,
    capacity_drop,
    collect_routing,
    expert_capacity,
    load_balancing_loss,
    router_z_loss,
)

__all__ = [
    "RouterOutput",
    "TopKRouter",
    "RoutedLayer",
    "collect_routing",
    "load_balancing_loss",
    "router_z_loss",
    "expert_capacity",
    "capacity_drop",
    "SparseMoE",
    "get_activation",
    "LoRALinear",
    "MoLEMLP",
    "MoRALinear",
    "grouped_linear",
    "grouped_mm_supported",
]

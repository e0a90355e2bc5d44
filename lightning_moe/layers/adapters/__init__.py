"""Adapter kinds, one file each (`lora.py`, `mole.py`, `mora.py`, `moe_lora.py`: LoRA on a SparseMoE's
experts), and their registry.

Importing this package registers the shipped kinds. A new kind: a file (in or outside the
package) with a config dataclass, a layer and a `register_adapter_kind(AdapterKind(...))` call.
"""

from .registry import (
    AdapterKind,
    adapter_kind,
    adapter_kinds,
    adapter_tensors,
    kind_of,
    register_adapter_kind,
    trainable_adapter_tensors,
)
from .lora import LoRAConfig, LoRALinear  # noqa: E402  (registers "lora")
from .mole import MoLEConfig, MoLEMLP  # noqa: E402  (registers "mole")
from .mora import MoRAConfig, MoRALinear  # noqa: E402  (registers "mora")
from .moe_lora import MoELoRA, MoELoRAConfig  # noqa: E402  (registers "moe_lora")

__all__ = ["AdapterKind", "register_adapter_kind", "adapter_kind", "adapter_kinds", "kind_of", "adapter_tensors",
           "trainable_adapter_tensors", "LoRAConfig", "LoRALinear", "MoLEConfig", "MoLEMLP", "MoRAConfig",
           "MoRALinear", "MoELoRA", "MoELoRAConfig"]

"""`mlp_layout`: how a dense feed-forward block is laid out, the one place that recognises it.

`SparseMoE.from_dense` (upcycling) and the MLP adapters (`MoLEMLP`) both read a Hugging Face MLP
through it, so a new layout is taught once. Recognised by attribute names (duck typing, so layers/
need not import transformers):
  gated: gate_proj, up_proj, down_proj, act_fn (Llama, Mistral, Qwen, ...)
  plain: fc1, fc2 and activation_fn or act (Phi, CLIP, ...)

`GatedMLP` is the gated layout as a module of its own, with those attribute names, so a shared
expert (Qwen2-MoE) keeps Hugging Face's key names and is read back through `mlp_layout`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

__all__ = ["MLPLayout", "mlp_layout", "GatedMLP"]


@dataclass
class MLPLayout:
    gated: bool  # act(gate(x)) * up(x) -> down; otherwise act(up(x)) -> down
    projections: dict[str, nn.Module]  # role ('gate' (gated only), 'up', 'down') -> the projection
    names: dict[str, str]  # role -> the projection's attribute name on the MLP
    activation: nn.Module


def mlp_layout(mlp: nn.Module) -> MLPLayout:
    """The layout of `mlp`; a ValueError naming the attributes found when it is not a known one."""
    if all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        names = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
        activation, gated = mlp.act_fn, True
    elif hasattr(mlp, "fc1") and hasattr(mlp, "fc2") and (hasattr(mlp, "activation_fn") or hasattr(mlp, "act")):
        names = {"up": "fc1", "down": "fc2"}
        activation, gated = (mlp.activation_fn if hasattr(mlp, "activation_fn") else mlp.act), False
    else:
        found = {n for n, _ in mlp.named_children()} | {n for n in vars(mlp) if not n.startswith("_")}
        raise ValueError(
            f"{type(mlp).__name__} has no known MLP layout: expected gate_proj/up_proj/down_proj/act_fn or "
            f"fc1/fc2/(activation_fn|act); found attributes {sorted(found)}"
        )
    return MLPLayout(gated, {role: getattr(mlp, n) for role, n in names.items()}, names, activation)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) without biases: Llama's MLP, Qwen2-MoE's shared expert."""

    def __init__(self, hidden_size: int, intermediate_size: int, activation: nn.Module) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = activation

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))

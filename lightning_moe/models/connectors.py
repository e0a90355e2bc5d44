"""Connectors (projectors): map an encoder's features into the LLM's embedding space.

`mlp2x_gelu` is LLaVA-1.5's projector; `linear` is LLaVA-1's. Chosen by name from a registry so
that configs and `save_pretrained` only need the name.
"""

from __future__ import annotations

from torch import nn


def mlp_connector(in_dim: int, out_dim: int, depth: int = 2) -> nn.Sequential:
    """LLaVA's `mlp{depth}x_gelu`: Linear, then (GELU, Linear) × (depth - 1)."""
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)


CONNECTORS = {
    "linear": lambda in_dim, out_dim: mlp_connector(in_dim, out_dim, depth=1),
    "mlp2x_gelu": lambda in_dim, out_dim: mlp_connector(in_dim, out_dim, depth=2),
}


def build_connector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    if kind not in CONNECTORS:
        raise ValueError(f"unknown connector {kind!r}; known: {sorted(CONNECTORS)}")
    return CONNECTORS[kind](in_dim, out_dim)

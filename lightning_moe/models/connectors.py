"""Connectors (projectors): map an encoder's features into the LLM's embedding space.

`mlp2x_gelu` is LLaVA-1.5's projector; `linear` is LLaVA-1's. `query` is Uni-MoE's audio aligner:
a fixed number of learned queries cross-attend to the encoder output (so every audio window gives
the same number of tokens, whatever its length), then an MLP projects them. Chosen by name from a
registry so that configs and `save_pretrained` only need the name (and the kind's options).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["CONNECTORS", "build_connector", "mlp_connector", "QueryConnector"]


def mlp_connector(in_dim: int, out_dim: int, depth: int = 2) -> nn.Sequential:
    """LLaVA's `mlp{depth}x_gelu`: Linear, then (GELU, Linear) × (depth - 1)."""
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)


class QueryLayer(nn.Module):
    """Queries cross-attend to the features, then a feed-forward block; pre-norm residuals."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm_q, self.norm_kv, self.norm_ff = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, queries: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        kv = self.norm_kv(features)
        queries = queries + self.attention(self.norm_q(queries), kv, kv, need_weights=False)[0]
        return queries + self.ff(self.norm_ff(queries))


class QueryConnector(nn.Module):
    """(n, S, in_dim) encoder features -> (n, num_queries, out_dim): learned queries, `num_layers` of
    cross-attention, then LLaVA's MLP projector (`projector_depth` linears)."""

    def __init__(self, in_dim: int, out_dim: int, num_queries: int = 32, num_layers: int = 2, num_heads: int = 4,
                 projector_depth: int = 2):
        super().__init__()
        if in_dim % num_heads:
            raise ValueError(f"query connector: encoder width {in_dim} is not divisible by num_heads={num_heads}")
        self.num_queries = num_queries
        self.queries = nn.Parameter(torch.randn(num_queries, in_dim) * in_dim**-0.5)
        self.layers = nn.ModuleList(QueryLayer(in_dim, num_heads) for _ in range(num_layers))
        self.norm = nn.LayerNorm(in_dim)
        self.projector = mlp_connector(in_dim, out_dim, projector_depth)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        queries = self.queries.to(features.dtype).expand(features.shape[0], -1, -1)  # (n, Q, in_dim)
        for layer in self.layers:
            queries = layer(queries, features)
        return self.projector(self.norm(queries))


# kind -> builder(in_dim, out_dim, **options)
CONNECTORS: dict[str, Callable[..., nn.Module]] = {
    "linear": lambda in_dim, out_dim: mlp_connector(in_dim, out_dim, depth=1),
    "mlp2x_gelu": lambda in_dim, out_dim: mlp_connector(in_dim, out_dim, depth=2),
    "query": QueryConnector,
}


def build_connector(kind: str, in_dim: int, out_dim: int, **options: Any) -> nn.Module:
    if kind not in CONNECTORS:
        raise ValueError(f"unknown connector {kind!r}; known: {sorted(CONNECTORS)}")
    try:
        return CONNECTORS[kind](in_dim, out_dim, **options)
    except TypeError as error:
        raise ValueError(f"connector {kind!r}: bad options {options} ({error})") from error

"""Routing profiles: what EdgeMoE's predicted prefetch and frequency eviction learn from a calibration set.

`profile_routing` runs a model over calibration batches (teacher-forced, as training does) and
counts, per MoE layer, how often each expert is chosen, and for each pair of consecutive MoE
layers how often expert i in layer l-1 and expert j in layer l are chosen by the same token
(the transition table). `predictors.TransitionPredictor` turns the table into guesses; the
cache's `freq_distance` policy uses the counts (`RoutingProfile.frequencies`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..layers import SparseMoE
from ..models.multimodal import batch_inputs

__all__ = ["RoutingProfile", "profile_routing", "PROFILE_NAME"]

PROFILE_NAME = "routing_profile.json"  # a store's routing profile: STORE/routing_profile.json by default


@dataclass
class RoutingProfile:
    """Routing statistics of a calibration set (saved as JSON beside a store)."""

    num_experts: list[int]  # per MoE layer
    counts: list[list[float]]  # per layer: (E,) times each expert was chosen
    transitions: list[list[list[float]]]  # per layer l: (E_{l-1}, E_l) co-occurrence counts; [] for l = 0
    tokens: int = 0

    @classmethod
    def empty(cls, num_experts: list[int]) -> "RoutingProfile":
        transitions = [[]] + [[[0.0] * num_experts[l] for _ in range(num_experts[l - 1])]
                              for l in range(1, len(num_experts))]
        return cls(list(num_experts), [[0.0] * e for e in num_experts], transitions, 0)

    def update(self, indices: list[Tensor]) -> None:
        """indices: per MoE layer, (tokens, k) experts chosen by the same tokens in every layer."""
        if len(indices) != len(self.num_experts):
            raise ValueError(f"routing of {len(indices)} layers for a profile of {len(self.num_experts)}")
        one_hot = []
        for l, idx in enumerate(indices):
            hot = torch.zeros(idx.shape[0], self.num_experts[l])
            hot.scatter_(1, idx.cpu(), 1.0)  # (tokens, E): 1 where chosen
            one_hot.append(hot)
            self.counts[l] = (torch.tensor(self.counts[l]) + hot.sum(0)).tolist()
        for l in range(1, len(indices)):
            pairs = one_hot[l - 1].T @ one_hot[l]  # (E_{l-1}, E_l) tokens choosing both
            self.transitions[l] = (torch.tensor(self.transitions[l]) + pairs).tolist()
        self.tokens += int(indices[0].shape[0]) if indices else 0

    def frequencies(self) -> dict[tuple[int, int], float]:
        """(layer, expert) -> share of that layer's routed slots."""
        out = {}
        for l, counts in enumerate(self.counts):
            total = sum(counts) or 1.0
            out.update({(l, e): c / total for e, c in enumerate(counts)})
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: str | Path) -> "RoutingProfile":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"routing profile {path} not found (run the `profile` command first)")
        return cls(**json.loads(path.read_text()))


@torch.no_grad()
def profile_routing(model: nn.Module, batches: Iterable[dict[str, Any]]) -> RoutingProfile:
    """Count the routing of every MoE layer (resident or offloaded) over teacher-forced batches."""
    layers = [m for m in model.modules() if isinstance(m, SparseMoE)]
    if not layers:
        raise ValueError("the model has no SparseMoE layer to profile")
    profile = RoutingProfile.empty([m.num_experts for m in layers])
    for batch in batches:
        out = model(**batch_inputs(batch))
        real = out.attention_mask.reshape(-1).bool()  # (B*T',) padding excluded
        profile.update([m.last_routing.indices[real] for m in layers])
    return profile

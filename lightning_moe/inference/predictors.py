"""Next-layer expert predictors: what the `ExpertOffloader` prefetches while a layer computes.

One interface, `Predictor.predict(layer, chosen, hidden)`: the experts MoE layer `layer` will
likely choose, given the experts `chosen` by the layer before it (layer - 1, or for layer 0 the
last layer of the previous token) and that earlier layer's input `hidden` (T, H). Two kinds:

- `TransitionPredictor` (EdgeMoE): from a routing profile's transition table (profiling.py):
  the `width` experts of layer l with the highest summed transition counts from the experts
  chosen in layer l-1 (ties and unseen rows broken by the layer's overall frequency); the first
  MoE layer, which has no earlier layer within the token, is predicted by its overall frequency.
- `LookaheadPredictor` (mixtral-offloading's speculative loading, Pre-gated MoE): the next
  layer's own router applied to this layer's input; the residual stream changes little from one
  layer to the next, so this often picks the experts the next layer will choose. Needs no
  profile; the first MoE layer of the next token, whose input is not known yet, gets no guess.

`build_predictor` makes the one a `prediction` name asks for.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from .profiling import RoutingProfile

__all__ = ["Predictor", "TransitionPredictor", "ExpertPredictor", "LookaheadPredictor", "Prediction", "PREDICTIONS",
           "build_predictor"]

Prediction = Literal["table", "lookahead"]
PREDICTIONS: tuple[str, ...] = get_args(Prediction)


class Predictor(ABC):
    """Guesses the experts a MoE layer will choose; `width` = most guesses per call."""

    width: int

    @abstractmethod
    def predict(self, layer: int, chosen: list[int] | None, hidden: Tensor | None = None) -> list[int]:
        """Likeliest experts of MoE layer `layer`, most likely first, given the experts `chosen` by the
        layer before it and that layer's input `hidden` (T, H); either may be None when unknown."""


class TransitionPredictor(Predictor):
    """Predicts the next MoE layer's experts from the experts chosen in the current one (a profile's table)."""

    def __init__(self, profile: RoutingProfile, width: int, min_probability: float = 0.0) -> None:
        """width: most experts predicted per layer; min_probability: drop guesses whose estimated
        probability (their share of the summed transition counts) is lower (a wrong prefetch costs a
        load and may evict an expert that was needed)."""
        if width < 1:
            raise ValueError(f"prefetch width must be at least 1, got {width}")
        self.profile, self.width, self.min_probability = profile, width, min_probability
        self._counts = [torch.tensor(c) for c in profile.counts]
        self._transitions = [torch.tensor(t) if t else None for t in profile.transitions]

    @property
    def num_layers(self) -> int:
        return len(self._counts)

    def predict(self, layer: int, chosen: list[int] | None, hidden: Tensor | None = None) -> list[int]:
        """The `width` likeliest experts of MoE layer `layer` given the experts `chosen` in layer - 1
        (layer 0 is predicted by frequency: the previous token's last layer is no transition)."""
        prior = self._counts[layer] / self._counts[layer].sum().clamp(min=1)  # (E,) in [0, 1]
        score = prior.clone()
        if layer > 0 and chosen:
            # summed transition counts dominate; the prior (< 1) only breaks ties
            score = self._transitions[layer][chosen].sum(0) + prior
        top = torch.topk(score, min(self.width, score.numel()))
        probability = top.values / score.sum().clamp(min=1e-12)  # (width,) estimated chance of each guess
        return [e for e, p in zip(top.indices.tolist(), probability.tolist()) if p >= self.min_probability]


ExpertPredictor = TransitionPredictor  # the name `lightning_moe.inference` has exported for it from the start


class LookaheadPredictor(Predictor):
    """Predicts a MoE layer's experts by applying its own router to the previous layer's input.

    routers: MoE layer -> its router, filled as the offloaded layers are built (the offloader
    shares its dict), so the predictor sees every router once the model is offloaded.
    """

    def __init__(self, routers: dict[int, nn.Module], width: int) -> None:
        if width < 1:
            raise ValueError(f"prefetch width must be at least 1, got {width}")
        self.routers, self.width = routers, width

    @torch.no_grad()
    def predict(self, layer: int, chosen: list[int] | None, hidden: Tensor | None = None) -> list[int]:
        """The experts layer `layer`'s router would pick for `hidden` (T, H): the highest summed routing
        probability over the tokens first, at most `width`, only experts some token picks."""
        if layer == 0 or hidden is None:  # the next token's first layer: its input is not known yet
            return []
        routing = self.routers[layer](hidden)
        score = routing.probs.sum(0)  # (E,)
        picked = torch.zeros_like(score, dtype=torch.bool)
        picked[routing.indices.reshape(-1)] = True
        score = score.masked_fill(~picked, -1.0)
        top = torch.topk(score, min(self.width, int(picked.sum())))
        return top.indices.tolist()


def build_predictor(prediction: Prediction, width: int, profile: RoutingProfile | None = None,
                    routers: dict[int, nn.Module] | None = None, min_probability: float = 0.0) -> Predictor:
    """The predictor `prediction` names: 'table' needs a routing profile, 'lookahead' the routers' dict."""
    if prediction == "table":
        if profile is None:
            raise ValueError("prefetch with prediction='table' needs a routing profile (or use prediction='lookahead')")
        return TransitionPredictor(profile, width, min_probability)
    if prediction == "lookahead":
        return LookaheadPredictor(routers if routers is not None else {}, width)
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")

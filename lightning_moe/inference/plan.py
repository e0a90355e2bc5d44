"""Expert-wise bitwidth planning (EdgeMoE) and the quality measures it plans against.

`plan_bitwidths(model, evaluate, config)` works on a resident sparse model:
 1. reference = evaluate(model) with float32 experts;
 2. sensitivity of each expert = reference - evaluate(model with only that expert quantised to
    `probe_bits`, every other expert float32): how much quality that one expert costs;
 3. every expert starts at the highest level (int8 by default); then, level by level (int4, then
    int2), the least sensitive experts are lowered: the largest n such that lowering the n least
    sensitive experts (of those at the previous level) keeps quality >= reference - tolerance,
    found by binary search on n (this assumes quality falls as more experts are lowered).
The model's weights are restored before returning. `evaluate` is any `model -> quality` callable,
higher is better: `exact_match_quality` (answers on a labelled split, in %) or
`token_agreement_quality` (teacher-forced next-token agreement with a reference, in %).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..models.multimodal import batch_inputs
from ..tokens import normalize_answer
from .generation import GenerationConfig, generate
from .quantize import FLOAT_BITS, QUANT_BITS, fake_quantize
from .store import expert_layers

__all__ = ["PlanConfig", "BitwidthPlan", "plan_bitwidths", "exact_match_quality", "token_agreement_quality",
           "reference_tokens"]

Key = tuple[int, int]


@dataclass
class PlanConfig:
    tolerance: float = 1.0  # largest quality drop allowed against float32, in the quality's units (points)
    levels: tuple[int, ...] = (8, 4, 2)  # bitwidths from high to low; every expert starts at levels[0]
    probe_bits: int | None = None  # bitwidth that measures sensitivity; default: the lowest level


@dataclass
class BitwidthPlan:
    bits: dict[Key, int]
    sensitivity: dict[Key, float]  # quality drop with only that expert at probe_bits
    reference_quality: float  # float32 experts
    quality: float  # with the planned bitwidths
    tolerance: float
    evaluations: int  # quality evaluations the plan took
    history: list[dict[str, Any]] = field(default_factory=list)  # every evaluated candidate

    def to_manifest(self) -> dict[str, Any]:
        """JSON-friendly form for the store's manifest ("layer:expert" keys)."""
        return {
            "bits": {f"{l}:{e}": b for (l, e), b in sorted(self.bits.items())},
            "sensitivity": {f"{l}:{e}": s for (l, e), s in sorted(self.sensitivity.items())},
            "reference_quality": self.reference_quality, "quality": self.quality, "tolerance": self.tolerance,
            "evaluations": self.evaluations, "history": self.history,
        }

    @staticmethod
    def bits_from_manifest(plan: dict[str, Any]) -> dict[Key, int]:
        return {tuple(int(x) for x in k.split(":")): int(b) for k, b in plan["bits"].items()}


class _ExpertWeights:
    """Set experts of a resident model to fake-quantised copies of their float weights, and back."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = [m for _, m in expert_layers(model)]
        if not self.layers:
            raise ValueError("the model has no resident SparseMoE layer to plan bitwidths for")
        self.original = [(m.w_in.detach().clone(), m.down_proj.detach().clone()) for m in self.layers]
        self.keys = [(l, e) for l, m in enumerate(self.layers) for e in range(m.num_experts)]
        self.current = {k: FLOAT_BITS for k in self.keys}  # what the weights hold now

    @torch.no_grad()
    def apply(self, bits: dict[Key, int]) -> None:
        """Set every expert to bits.get(key, 32); only experts whose bitwidth changes are rewritten."""
        for l, e in self.keys:
            b = bits.get((l, e), FLOAT_BITS)
            if self.current[(l, e)] == b:
                continue
            w_in, w_down = self.original[l]
            self.layers[l].w_in[e].copy_(fake_quantize(w_in[e], b))
            self.layers[l].down_proj[e].copy_(fake_quantize(w_down[e], b))
            self.current[(l, e)] = b

    def restore(self) -> None:
        self.apply({})


def plan_bitwidths(model: nn.Module, evaluate: Callable[[nn.Module], float], config: PlanConfig | None = None,
                   progress: Callable[[str], None] | None = None) -> BitwidthPlan:
    """Plan per-expert bitwidths for a resident model (module docstring)."""
    config = config or PlanConfig()
    for b in config.levels:
        if b not in QUANT_BITS:
            raise ValueError(f"plan levels must be among {QUANT_BITS}, got {config.levels}")
    probe = config.probe_bits or config.levels[-1]
    say = progress or (lambda _: None)
    weights = _ExpertWeights(model)
    history: list[dict[str, Any]] = []

    def quality(bits: dict[Key, int], what: str) -> float:
        weights.apply(bits)
        value = float(evaluate(model))
        history.append({"what": what, "quality": value})
        say(f"{what}: {value:.3f}")
        return value

    try:
        reference = quality({}, "float32")
        sensitivity = {k: reference - quality({k: probe}, f"only expert {k} at int{probe}") for k in weights.keys}
        order = sorted(weights.keys, key=lambda k: (sensitivity[k], k))  # least sensitive first
        floor = reference - config.tolerance
        bits = {k: config.levels[0] for k in weights.keys}
        current = quality(bits, f"every expert at int{config.levels[0]}")
        for high, low in zip(config.levels, config.levels[1:]):
            candidates = [k for k in order if bits[k] == high]
            lo, hi, best = 0, len(candidates), current  # invariant: lowering `lo` experts is within tolerance
            while lo < hi:
                n = (lo + hi + 1) // 2
                trial = {**bits, **{k: low for k in candidates[:n]}}
                value = quality(trial, f"{n} least sensitive experts at int{low}")
                if value >= floor:
                    lo, best = n, value
                else:
                    hi = n - 1
            bits.update({k: low for k in candidates[:lo]})
            current = best
        return BitwidthPlan(bits, sensitivity, reference, current, config.tolerance, len(history), history)
    finally:
        weights.restore()


# ---------------------------------------------------------------------------- quality measures
def exact_match_quality(
    model: nn.Module, batches: Sequence[dict[str, Any]], tokenizer, max_new_tokens: int = 4
) -> float:
    """Exact-match accuracy (%) of greedy answers against the batches' `answers`."""
    config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    correct = total = 0
    for batch in batches:
        inputs = batch_inputs(batch, prompt=True)
        out = generate(model, inputs.pop("input_ids"), inputs.pop("attention_mask"), config, **inputs)
        answers = tokenizer.batch_decode(out.tokens, skip_special_tokens=True)
        correct += sum(normalize_answer(p) == normalize_answer(a) for p, a in zip(answers, batch["answers"]))
        total += len(answers)
    return 100.0 * correct / max(total, 1)


@torch.no_grad()
def reference_tokens(model: nn.Module, batches: Sequence[dict[str, Any]]) -> list[Tensor]:
    """Teacher-forced argmax next tokens of a reference model, per batch (B, T')."""
    return [model(**batch_inputs(b)).logits.argmax(-1) for b in batches]


@torch.no_grad()
def token_agreement_quality(model: nn.Module, batches: Sequence[dict[str, Any]], reference: list[Tensor]) -> float:
    """% of real positions where the model's argmax next token equals the reference's."""
    agree = total = 0
    for batch, ref in zip(batches, reference):
        out = model(**batch_inputs(batch))
        real = out.attention_mask.bool()
        agree += int(((out.logits.argmax(-1) == ref) & real).sum())
        total += int(real.sum())
    return 100.0 * agree / max(total, 1)

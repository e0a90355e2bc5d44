"""Bitwidth planning: a hand-computed plan on a scripted quality function; a real plan keeps its
tolerance, lowers less sensitive experts first and leaves the weights as they were; the plan lands
in the store's manifest."""

from __future__ import annotations

import json

import pytest
import torch

from lightning_moe.inference import (ExpertStore, GenerationConfig, PlanConfig, apply_bits, exact_match_quality,
                                     export_store, generate, load_resident_model, plan_bitwidths,
                                     token_agreement_quality)
from lightning_moe.inference.plan import BitwidthPlan, reference_tokens
from lightning_moe.inference.store import expert_layers


def _bits_of(model) -> dict:
    """Each expert's bitwidth, read off its weights: int-b weights take at most 2**b values per row."""
    out = {}
    for l, (_, moe) in enumerate(expert_layers(model)):
        for e in range(moe.num_experts):
            distinct = max(len(torch.unique(row)) for row in moe.w_in[e])
            out[(l, e)] = next((b for b in (2, 4, 8) if distinct <= 2**b), 32)
    return out


def test_plan_on_a_scripted_quality_matches_the_hand_computed_plan(sparse_model):
    # quality = 100 - sum over experts of cost(expert, bits); costs chosen by hand
    cost = {2: {(0, 0): 0.1, (0, 1): 5.0, (0, 2): 0.3, (0, 3): 0.2, (1, 0): 0.05, (1, 1): 2.0, (1, 2): 0.4, (1, 3): 0.6},
            4: {k: 0.02 for k in [(l, e) for l in range(2) for e in range(4)]}, 8: {}}
    cost[4][(0, 1)] = 1.0

    def quality(model) -> float:
        return 100.0 - sum(cost.get(b, {}).get(k, 0.0) for k, b in _bits_of(model).items())

    before = [m.w_in.clone() for _, m in expert_layers(sparse_model)]
    plan = plan_bitwidths(sparse_model, quality, PlanConfig(tolerance=0.7))
    # sensitivity = int2 cost; order: (1,0) .05, (0,0) .1, (0,3) .2, (0,2) .3, (1,2) .4, (1,3) .6, (1,1) 2, (0,1) 5
    # int4 for n least sensitive: cost 0.02 each, (0,1) costs 1.0 -> the 7 others fit (0.14 <= 0.7)
    # int2 among those 7, in order: (1,0),(0,0),(0,3) cost .05+.1+.2 = .35 (+ the other 4 at int4 .08 = .43);
    # adding (0,2) (.3 - .02) gives .71 > .7
    expected = {k: 8 for k in cost[2]}
    expected.update({k: 4 for k in [(0, 2), (1, 2), (1, 3), (1, 1)]})
    expected.update({k: 2 for k in [(1, 0), (0, 0), (0, 3)]})
    assert plan.bits == expected
    assert abs(plan.quality - (100 - 0.43)) < 1e-9 and plan.reference_quality == 100.0
    assert all(torch.equal(a, m.w_in) for a, (_, m) in zip(before, expert_layers(sparse_model)))  # restored


def test_real_plan_keeps_the_tolerance_and_is_monotone_in_sensitivity(sparse_model, tmp_path):
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(10, 60, (4, 12), generator=g), "attention_mask": torch.ones(4, 12)}]
    reference = reference_tokens(sparse_model, batches)
    plan = plan_bitwidths(sparse_model, lambda m: token_agreement_quality(m, batches, reference),
                          PlanConfig(tolerance=5.0))
    assert plan.reference_quality == 100.0 and plan.quality >= 95.0
    order = sorted(plan.bits, key=lambda k: (plan.sensitivity[k], k))
    assert [plan.bits[k] for k in order] == sorted(plan.bits[k] for k in order)  # less sensitive: fewer or equal bits
    assert min(plan.bits.values()) < 8  # something was lowered
    # re-measured, not the planner's own figure: the planned store, loaded back, against the float32 argmax
    planned = load_resident_model(export_store(sparse_model, tmp_path / "planned", bits=plan.bits))
    with torch.no_grad():
        out = planned(input_ids=batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"])
    agreement = 100.0 * (out.logits.argmax(-1) == reference[0]).double().mean().item()  # no padding here
    assert agreement >= 95.0 and agreement == pytest.approx(plan.quality)
    assert agreement < 100.0 or min(plan.bits.values()) == 8  # lowered experts cost something, or nothing was lowered


def test_exact_match_quality_of_hand_set_answers(sparse_model, tokenizer):
    """Two prompts: one reference is the model's own greedy answer written differently (case, trailing
    period), the other a word it cannot produce: 50%."""
    from tests.inference.conftest import prompt_batch

    ids, mask, pixels = prompt_batch(sparse_model)
    config = GenerationConfig(max_new_tokens=4, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    own = tokenizer.batch_decode(generate(sparse_model, ids, mask, config, pixel_values=pixels).tokens,
                                 skip_special_tokens=True)
    assert own[0].strip()  # something to match
    batch = {"prompt_input_ids": ids, "prompt_attention_mask": mask, "pixel_values": pixels,
             "answers": [own[0].upper() + ".", "no-such-answer"]}
    assert exact_match_quality(sparse_model, [batch], tokenizer) == 50.0
    batch["answers"] = [own[0], own[1]]
    assert exact_match_quality(sparse_model, [batch], tokenizer) == 100.0


def test_applied_plan_is_in_the_manifest_and_shrinks_the_store(sparse_model, tmp_path):
    store = export_store(sparse_model, tmp_path / "s")
    before = store.expert_memory_bytes
    bits = {(0, 0): 2, (0, 1): 4, (1, 3): 8}
    plan = BitwidthPlan(bits, {k: 0.0 for k in bits}, 1.0, 1.0, 0.5, 3)
    apply_bits(store, bits, plan.to_manifest())
    reopened = ExpertStore(store.directory)
    assert reopened.bits()[(0, 0)] == 2 and reopened.bits()[(1, 3)] == 8 and reopened.bits()[(1, 0)] == 32
    assert reopened.expert_memory_bytes < before
    manifest = json.loads((store.directory / "manifest.json").read_text())
    assert BitwidthPlan.bits_from_manifest(manifest["plan"]) == bits

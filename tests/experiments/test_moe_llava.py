"""The MoE-LLaVA experiment: its verdicts on hand-made results (a tie, a clear non-inferiority, a worse sparse
model, an arm at ceiling, the POPE comparisons), the parameters of its arms against a hand computation, the
function-preserving widening of the dense model of the MoE's total, the co-occurrence POPE data, and `--quick`
over two seeds."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from lightning_moe.experiments import answers, moe_llava
from lightning_moe.models import MoEConfig, MultimodalLM, build_multimodal, parameter_counts, upcycle
from tests.conftest import TINY_LLM, tiny_encoders

JITTER = [0.0, 0.004, -0.004, 0.002, -0.002]  # per seed, so that the intervals have a width
CHANCE = {"mean": 0.35, "pope": 0.5}


def _values(mean: dict[str, float], pope_f1: dict[str, float] | None = None,
            yes_error: dict[str, float] | None = None, pope_accuracy: float = 0.8,
            jitter: list[float] = JITTER) -> dict[str, dict[str, list[float]]]:
    """Per-seed values as `verdicts` reads them: each arm at its number, moe_top1 and moe_top2 moved by the seed's
    jitter (dense arms at their number in every seed)."""
    def per_seed(numbers: dict[str, float]) -> dict[str, list[float]]:
        return {arm: [numbers[arm] + (by if arm.startswith("moe") else 0.0) for by in jitter] for arm in moe_llava.ARMS}

    flat = {arm: 0.0 for arm in moe_llava.ARMS}
    return {"mean": per_seed(mean), "pope_f1": per_seed(pope_f1 or flat),
            "pope_yes_error": per_seed(yes_error or flat),
            "pope_accuracy": per_seed({arm: pope_accuracy for arm in moe_llava.ARMS})}


def _arms(dense: float, moe: float) -> dict[str, float]:
    return {"dense": dense, "dense_wide": dense, "moe_top1": moe, "moe_top2": moe}


def test_a_clear_non_inferiority_is_confirmed():
    decided = moe_llava.verdicts(_values(_arms(0.80, 0.795)), CHANCE)
    assert decided["gates"] == []
    assert decided["differences"]["equal_activated"]["low"] > -moe_llava.MARGIN
    assert decided["verdicts"]["equal_activated"] == decided["verdicts"]["equal_total"] == "confirmed"
    claim = "matches or beats the dense model with fewer or equal activated parameters"
    assert decided["claims"][claim] == "confirmed"


def test_a_tie_with_scattered_seeds_is_inconclusive():
    decided = moe_llava.verdicts(_values(_arms(0.80, 0.80), jitter=[0.06, -0.06, 0.04, -0.04, 0.0]), CHANCE)
    assert decided["verdicts"]["equal_activated"] == "inconclusive: the interval straddles the margin"
    assert decided["claims"]["matches or beats the dense model with fewer or equal activated parameters"] == (
        "inconclusive: the interval straddles the margin")


def test_a_sparse_model_clearly_worse_is_not_confirmed():
    decided = moe_llava.verdicts(_values(_arms(0.80, 0.70)), CHANCE)
    assert decided["verdicts"]["equal_activated"] == decided["verdicts"]["equal_total"] == "not confirmed"


def test_an_arm_at_ceiling_makes_its_comparisons_inconclusive():
    decided = moe_llava.verdicts(_values({"dense": 0.80, "moe_top1": 0.80, "moe_top2": 0.996, "dense_wide": 0.995}),
                                 CHANCE)
    assert decided["verdicts"]["equal_activated"] == "confirmed"  # its own arms pass their gates
    assert decided["verdicts"]["equal_total"].startswith("inconclusive: MoE top-2 (MoE-LLaVA) at ceiling")
    claim = decided["claims"]["matches or beats the dense model with fewer or equal activated parameters"]
    assert claim.startswith("inconclusive: not every comparison is decided")


def test_pope_comparisons_read_f1_up_and_the_yes_ratio_error_down():
    fewer_hallucinations = _values(_arms(0.8, 0.8), pope_f1=_arms(0.70, 0.80), yes_error=_arms(0.20, 0.05))
    decided = moe_llava.verdicts(fewer_hallucinations, CHANCE)
    assert decided["differences"]["pope_yes_error"]["mean"] == pytest.approx(0.15)  # dense's error - the MoE's
    assert decided["verdicts"]["pope_f1"] == decided["verdicts"]["pope_yes_error"] == "confirmed"
    assert decided["claims"]["hallucinates less on POPE"] == "confirmed"
    more = moe_llava.verdicts(_values(_arms(0.8, 0.8), pope_f1=_arms(0.80, 0.70), yes_error=_arms(0.05, 0.20)), CHANCE)
    assert more["claims"]["hallucinates less on POPE"] == "not confirmed"
    # POPE at chance: nothing learnt about existence to compare
    blind = moe_llava.verdicts(_values(_arms(0.8, 0.8), pope_accuracy=0.5), CHANCE)
    assert blind["verdicts"]["pope_f1"].startswith("inconclusive: MoE top-1 (equal activated) on POPE at or below chance")
    assert blind["verdicts"]["equal_activated"] == "confirmed"  # the primary metric's gates are the primary metric's


@pytest.fixture
def dense(tokenizer) -> MultimodalLM:
    return build_multimodal(tokenizer, "tiny-llama", TINY_LLM, tiny_encoders()).eval()


def test_parameter_counts_of_the_arms_by_hand(dense):
    # TINY_LLM: hidden 64, MLP 128, 2 layers; stage 3 upcycles layer 0 ("::2") into 4 experts with a 64 x 4 router.
    # A gated MLP holds 3 x 64 x 128 = 24576 parameters, 3 x 64 = 192 per neuron
    base = parameter_counts(dense).total
    counts = {k: parameter_counts(moe_llava.upcycle_copy(dense, moe_llava.moe_config(k))) for k in (1, 2)}
    assert counts[2].total - base == 3 * 24576 + 256  # three more copies and the router
    assert counts[1].total == counts[2].total
    assert counts[2].activated - base == 24576 + 256  # a second copy per token, and the router
    assert counts[1].activated - base == 256  # top-1: as many as the dense model, plus the router
    # the wide dense model: every width adds 2 layers x 192 = 384 per neuron; 73984 / 384 = 192.67 -> 193 more
    width = moe_llava.same_total_width(dense, counts[2].total)
    assert width == 128 + 193
    moe_llava.widen_mlps(dense, width)
    assert parameter_counts(dense).total - base == 384 * 193
    assert parameter_counts(dense).activated == parameter_counts(dense).total


def test_widening_keeps_what_the_model_computes_and_saves_a_loadable_model(dense, tokenizer, tmp_path):
    ids = torch.randint(10, len(tokenizer), (2, 12))
    mask = torch.ones_like(ids)
    before = dense(ids, mask).logits
    moe_llava.widen_mlps(dense, 200, seed=3)
    mlp = dense.llm.model.layers[1].mlp
    assert mlp.up_proj.weight.shape == (200, 64) and mlp.down_proj.weight.shape == (64, 200)
    assert mlp.up_proj.weight[128:].abs().sum() > 0 and mlp.down_proj.weight[:, 128:].abs().sum() == 0
    torch.testing.assert_close(dense(ids, mask).logits, before, rtol=0, atol=1e-6)
    dense.save_pretrained(tmp_path)
    loaded = MultimodalLM.from_pretrained(tmp_path).eval()
    assert loaded.llm.config.intermediate_size == 200
    torch.testing.assert_close(loaded(ids, mask).logits, before, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="below the MLPs' 200"):
        moe_llava.widen_mlps(dense, 100)


def test_widening_refuses_a_sparse_layer(dense):
    upcycle(dense, MoEConfig(num_experts=2, top_k=1, layers="all"))
    with pytest.raises(ValueError, match="SparseMoE has no known MLP layout"):
        moe_llava.widen_mlps(dense, 200)


def test_cooccurrence_pope_data_is_generated_at_the_plans_sizes(tmp_path):
    root = moe_llava.data_root(moe_llava.QUICK, tmp_path)
    assert moe_llava.QUICK.pope == "pope_cooccur" and root.is_relative_to(tmp_path / "data")
    assert moe_llava.domains(moe_llava.QUICK) == (*moe_llava.DOMAINS, "pope_cooccur")
    key = answers(root, "pope_cooccur", "test")
    assert len(key) == moe_llava.QUICK.eval_samples and set(key) <= {"yes", "no"}
    assert moe_llava.data_root(moe_llava.QUICK, tmp_path) == root  # generated once, then reused
    shipped = moe_llava.data_root(replace(moe_llava.QUICK, pope="pope"), tmp_path)
    assert (shipped / "pope" / "test.jsonl").is_file() and not (shipped / "pope_cooccur").exists()


@pytest.mark.slow  # the quick experiment over two seeds: stages 1 and 2 and four arms per seed through the CLI
def test_quick_run_over_two_seeds(tmp_path):
    summary = moe_llava.main(["--out", str(tmp_path), "--quick", "--seeds", "0", "1", "--jobs", "1",
                              "--threads", "1"])
    assert summary == json.loads((tmp_path / "results.json").read_text())
    assert summary["seeds"] == [0, 1] and set(summary["verdicts"]) == set(moe_llava.COMPARISONS)
    assert set(summary["claims"]) == set(moe_llava.CLAIMS)
    seed = summary["per_seed"]["0"]
    params, runs = seed["parameters"], seed["runs"]
    # every arm: the same steps from the same starting point; parameters counted on the trained models
    assert {runs[arm]["steps"] for arm in moe_llava.ARMS} == {seed["plan"]["steps"]}
    assert params["moe_top1"]["total"] == params["moe_top2"]["total"] > params["dense"]["total"]
    assert params["dense"]["activated"] < params["moe_top1"]["activated"] < params["dense"]["activated"] + 1000
    assert params["moe_top1"]["activated"] < params["moe_top2"]["activated"] < params["dense_wide"]["activated"]
    # the wide model's total within half a neuron's parameters of the MoE's
    widths = seed["widths"]
    per_neuron = (params["dense_wide"]["total"] - params["dense"]["total"]) / (widths["wide_width"] - widths["width"])
    assert abs(params["dense_wide"]["total"] - params["moe_top2"]["total"]) <= per_neuron / 2
    assert params["dense"]["trainable"] < params["dense"]["total"]  # MLPs and connector only
    for arm in moe_llava.ARMS:
        assert set(seed["accuracy"][arm]) == {*moe_llava.DOMAINS, "pope_cooccur"}
        assert set(seed["pope"][arm]) == {"accuracy", "f1", "yes_ratio", "yes_error"}
    assert set(summary["learning_curves"]) == set(moe_llava.ARMS)
    # each seed trains its own starting point, at the seed, in its directory
    for s in (0, 1):
        assert (tmp_path / f"seed{s}" / "base" / "models" / "instruct_wide").is_dir()
        assert {summary["per_seed"][str(s)]["runs"][stage]["seed"] for stage in ("align", "instruct")} == {s}
    assert not (tmp_path / "base").exists()
    text = (tmp_path / "results.md").read_text()
    for heading in ("## Protocol", "margin -0.020", "## MoE-LLaVA", "moe_top1 minus dense", "Verdict on", "## Seed 1"):
        assert heading in text, heading

"""The statistics every verdict rests on, on hand-computed cases: mean / range / interval over seeds, paired
differences with their 95 % t and bootstrap intervals, the verdict rule and its gates, the seeds' agreement,
the protocol's text."""

from __future__ import annotations

import math

import pytest

from lightning_moe.experiments.protocol import Comparison, Protocol, select_first
from lightning_moe.experiments.statistics import (agreement, agreement_words, at_ceiling_or_chance, bootstrap_interval,
                                                  curve_stat, decide, difference_words, paired_difference, seed_stat,
                                                  spread, t_quantile)


def test_t_quantiles_match_scipy_and_the_table_by_hand():
    assert t_quantile(2) == 4.303 and t_quantile(9) == 2.262  # the printed table
    stats = pytest.importorskip("scipy.stats")  # an independent oracle where it is installed
    for df in (1, 2, 5, 9, 29, 30, 31, 40, 100, 1000):
        assert t_quantile(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-3), df
    with pytest.raises(ValueError, match="at least two seeds"):
        t_quantile(0)


def test_seed_stat_mean_range_standard_error_and_interval():
    stat = seed_stat([0.5, 0.7, 0.9])
    # sample standard deviation 0.2; standard error 0.2 / sqrt(3) = 0.1154701; half-width 4.303 x that = 0.4968677
    assert stat["mean"] == pytest.approx(0.7) and (stat["min"], stat["max"], stat["n"]) == (0.5, 0.9, 3)
    assert stat["sem"] == pytest.approx(0.2 / math.sqrt(3))
    assert (stat["low"], stat["high"]) == pytest.approx((0.7 - 0.4968677, 0.7 + 0.4968677), abs=1e-6)
    assert seed_stat([0.4])["sem"] is None and seed_stat([0.4])["low"] is None
    assert spread(stat) == "0.700 (0.500-0.900)" and spread(stat, 100, 1) == "70.0 (50.0-90.0)"
    assert spread(seed_stat([0.4])) == "0.400" and spread(None) == ""
    with pytest.raises(ValueError, match="no values"):
        seed_stat([])


def test_paired_t_interval_by_hand():
    # a - b per seed: +0.3, +0.3, +0.2: mean 0.26667, sd 0.057735, standard error 0.033333, half-width
    # 4.303 x 0.033333 = 0.143433: [0.123233, 0.410100]
    diff = paired_difference([0.8, 0.8, 0.7], [0.5, 0.5, 0.5])
    assert diff["mean"] == pytest.approx(0.266667, abs=1e-6) and diff["sem"] == pytest.approx(0.033333, abs=1e-6)
    assert (diff["low"], diff["high"]) == pytest.approx((0.123233, 0.410100), abs=1e-6)
    assert (diff["above"], diff["below"], diff["ties"], diff["n"]) == (3, 0, 0, 3)
    # +0.1, +0.3, -0.1: mean 0.1, standard error 0.1154701: [-0.3968677, 0.5968677]
    wide = paired_difference([0.6, 0.8, 0.4], [0.5, 0.5, 0.5])
    assert (wide["low"], wide["high"]) == pytest.approx((-0.3968677, 0.5968677), abs=1e-6)
    one = paired_difference([0.8], [0.5])
    assert one["low"] is None and one["high"] is None
    with pytest.raises(ValueError, match="2 against 1"):
        paired_difference([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="'t' or 'bootstrap'"):
        paired_difference([0.1, 0.2], [0.1, 0.2], method="z")


def test_paired_bootstrap_is_seeded_and_matches_enumeration():
    # two differences 0 and 1: resampled means 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4, so the 2.5th and
    # 97.5th percentiles are 0 and 1
    assert bootstrap_interval([0.0, 1.0], seed=3) == (0.0, 1.0)
    diffs = [0.1, 0.3, -0.1, 0.2, 0.05]
    assert bootstrap_interval(diffs, seed=7) == bootstrap_interval(diffs, seed=7)  # seeded: the same interval
    low, high = bootstrap_interval(diffs, seed=7)
    assert min(diffs) <= low < sum(diffs) / len(diffs) < high <= max(diffs)
    boot = paired_difference([0.2, 0.4, 0.0], [0.1, 0.1, 0.1], method="bootstrap", seed=1)
    assert boot["method"] == "bootstrap" and (boot["low"], boot["high"]) == pytest.approx(
        bootstrap_interval([0.1, 0.3, -0.1], 1))
    with pytest.raises(ValueError, match="at least two seeds"):
        bootstrap_interval([0.1])


@pytest.mark.parametrize("a, b, margin, expected", [
    ([0.8, 0.8, 0.7], [0.5, 0.5, 0.5], 0.1, "confirmed"),  # [0.123, 0.410] clears 0.1
    ([0.8, 0.8, 0.7], [0.5, 0.5, 0.5], 0.123233, "confirmed"),  # the low end at the margin: inclusive
    ([0.8, 0.8, 0.7], [0.5, 0.5, 0.5], 0.2, "inconclusive: the interval straddles the margin"),
    ([0.51, 0.52, 0.5, 0.51], [0.5, 0.5, 0.5, 0.5], 0.05, "not confirmed"),  # small and tight: below the margin
    ([0.4, 0.4, 0.41], [0.5, 0.5, 0.5], 0.0, "not confirmed"),  # a loss
    ([0.6, 0.8, 0.4], [0.5, 0.5, 0.5], 0.05, "inconclusive: the interval straddles the margin"),  # mixed seeds
    ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5], 0.05, "not confirmed"),  # a tie in every seed: no gain
    ([0.9], [0.5], 0.05, "inconclusive: one seed, no interval"),
])
def test_decide(a, b, margin, expected):
    assert decide(paired_difference(a, b), margin) == expected


@pytest.mark.parametrize("a, b, expected", [
    # a - b: -0.01, 0.0, -0.005: mean -0.005, sd 0.005, half-width 4.303 x 0.002887 = 0.0124: [-0.0174, 0.0074]
    ([0.79, 0.8, 0.795], [0.8, 0.8, 0.8], "confirmed"),  # at most 2 points below: non-inferior
    ([0.7, 0.71, 0.7], [0.8, 0.8, 0.8], "not confirmed"),  # 10 points below, tight: inferior
    ([0.75, 0.85, 0.8], [0.8, 0.8, 0.8], "inconclusive: the interval straddles the margin"),  # a tie, wide: unknown
])
def test_decide_with_a_negative_margin_is_non_inferiority(a, b, expected):
    assert decide(paired_difference(a, b), -0.02) == expected


def test_a_failed_gate_makes_any_verdict_inconclusive():
    clear = paired_difference([0.8, 0.8, 0.7], [0.5, 0.5, 0.5])
    assert decide(clear, 0.1, [None, "oracle failed", "arm at ceiling"]) == "inconclusive: oracle failed"
    assert decide(clear, 0.1, [None, None]) == "confirmed"


def test_ceiling_and_chance_gates():
    assert at_ceiling_or_chance("MoLE", [1.0, 0.995, 1.0], chance=0.5) == "MoLE at ceiling (99.8 %)"
    assert at_ceiling_or_chance("LoRA", [0.5, 0.51], chance=0.5).startswith("LoRA at or below chance")
    assert at_ceiling_or_chance("LoRA", [0.3, 0.3], chance=0.5).startswith("LoRA at or below chance")
    assert at_ceiling_or_chance("LoRA", [0.8, 0.9], chance=0.5) is None


def test_difference_words_give_the_interval_and_the_verdict():
    diff = paired_difference([0.8, 0.8, 0.7], [0.5, 0.5, 0.5])
    assert difference_words(diff, "MoLE - LoRA", 100, " points", margin=0.1) == (
        "MoLE - LoRA +26.667 points [+12.323, +41.010] points (95 % paired t, 3 seeds: higher in 3, lower in 0, "
        "equal in 0); margin +10.000 points: **confirmed**")
    assert "one seed, no interval" in difference_words(paired_difference([0.8], [0.5]), "x")


def test_agreement_reports_a_label_only_when_every_seed_gives_it():
    assert agreement(["router", "router", "router"]) == ("router", 3, 3)
    assert agreement(["not confirmed", "confirmed", "not confirmed"]) == ("inconclusive", 2, 3)
    # a three-way tie is no majority
    assert agreement_words(["partly", "confirmed", "not confirmed"]) == (
        "**inconclusive** (seeds disagree: partly in 1, confirmed in 1, not confirmed in 1)")
    assert agreement_words(["x", "x", "x"]) == "**x** (3 of 3 seeds agree)"
    with pytest.raises(ValueError):
        agreement([])


def test_curve_stat_keeps_the_steps_every_seed_logged():
    curves = [[[10, 0.5], [20, 0.7], [30, 0.8]], [[10, 0.7], [20, 0.9]]]
    points = curve_stat(curves, scale=2.0)
    assert [p[0] for p in points] == [20.0, 40.0]  # step 30 only in one seed
    # mean 0.6 of 0.5 and 0.7: standard error 0.1, half-width 12.706 x 0.1
    assert points[0][1:] == pytest.approx([0.6, 0.6 - 1.2706, 0.6 + 1.2706])
    assert curve_stat([[[5, 0.4]]]) == [[5.0, 0.4, 0.4, 0.4]] and curve_stat([]) == []


def test_protocol_text_names_seeds_splits_primary_comparisons_gates_and_the_chosen_settings():
    protocol = Protocol(question="Q?", seeds=[0, 1, 2], selection_split="val", reported_split="test",
                        selection="the smallest rank that works.", verdict_rule="a rule.",
                        primary="mean exact match over the domains",
                        comparisons=[Comparison("mole", "lora", 0.03, "MoLE helps"),
                                     Comparison("moe", "dense", -0.02, "as good", metric="POPE F1")],
                        gates=["oracle failed"],
                        difficulties=["easy", "hard"],
                        settings={"rank": 2, "steps": 300, "val_scores": [{"rank": 1}]})
    text = protocol.markdown()
    assert "Seeds: 0, 1, 2 (3)" in text and "chosen on the val split" in text and "the test split" in text
    assert "Chosen: rank = 2, steps = 300." in text and "val_scores" not in text  # lists stay in results.json
    assert "Primary metric: mean exact match over the domains." in text
    assert "Comparison: mole - lora on the primary metric, margin +0.030 (MoLE helps)." in text
    assert "Comparison: moe - dense on POPE F1, margin -0.020 (as good)." in text
    assert "Inconclusive when: oracle failed." in text and "Difficulty of the data, chosen on val, the ladder (easiest first): easy; hard. Rule: the first" in text
    assert "no discriminating setting" in text
    assert Protocol.from_dict(protocol.as_dict()) == protocol


# ---------------------------------------------------------------- the ladder: the first qualifying rung, on val
def _ladder_run(verdicts: dict[str, list[str]]) -> tuple[dict, list[str]]:
    measured = []

    def measure(rung):
        measured.append(rung["setting"])
        return {"val": rung["setting"]}

    chosen = select_first([{"setting": name} for name in verdicts], measure,
                          lambda rung, scores: verdicts[scores["val"]])
    return chosen, measured


def test_select_first_takes_the_first_qualifying_rung_and_measures_no_later_one():
    chosen, measured = _ladder_run({"easy": ["at ceiling"], "middle": [], "hard": []})
    assert chosen["met"] and chosen["chosen"]["setting"] == "middle" and measured == ["easy", "middle"]
    assert [(t["setting"], t["rejected"]) for t in chosen["tried"]] == [("easy", ["at ceiling"]), ("middle", [])]
    assert chosen["tried"][0]["val"] == {"val": "easy"}
    # a reason of None is a passed condition, not a rejection
    chosen, _ = _ladder_run({"easy": [None, None]})
    assert chosen["met"] and chosen["chosen"]["rejected"] == []


def test_select_first_without_a_qualifying_rung_keeps_the_last_and_every_reason():
    chosen, measured = _ladder_run({"easy": ["at ceiling"], "hard": ["at chance", "no gap"]})
    assert not chosen["met"] and chosen["chosen"]["setting"] == "hard" and measured == ["easy", "hard"]
    assert chosen["tried"][1]["rejected"] == ["at chance", "no gap"]
    with pytest.raises(ValueError, match="no rung measured"):
        select_first([], lambda rung: {}, lambda rung, scores: [])


def test_select_first_skips_the_rungs_its_rule_rules_out_and_never_chooses_one():
    measured = []

    def measure(rung):
        measured.append(rung["setting"])
        return rung["setting"]

    def skip(rung, tried):  # nothing after a rung at ceiling can qualify
        return "an easier rung at ceiling" if any("at ceiling" in t["rejected"] for t in tried) else None

    reasons = {"a": ["at ceiling"], "b": [], "c": []}
    chosen = select_first([{"setting": n} for n in reasons], measure, lambda rung, scores: reasons[scores], skip)
    assert measured == ["a"] and not chosen["met"] and chosen["chosen"]["setting"] == "a"
    assert [(t["setting"], t["val"], t.get("skipped", False)) for t in chosen["tried"]] == [
        ("a", "a", False), ("b", None, True), ("c", None, True)]
    assert chosen["tried"][1]["rejected"] == ["an easier rung at ceiling"]
    text = Protocol(question="?", seeds=[0], selection_split="val", reported_split="test", selection="ladder.",
                    verdict_rule="rule.", settings={"ladder": chosen["tried"]}).markdown()
    assert "- Tried on val: b: skipped (an easier rung at ceiling)." in text


def test_protocol_lists_the_rungs_tried_and_the_chosen_one():
    protocol = Protocol(question="?", seeds=[0], selection_split="val", reported_split="test", selection="ladder.",
                        verdict_rule="rule.", difficulties=["shipped", "noisy"], difficulty_rule="the first that fits",
                        settings={"ladder": [{"setting": "shipped", "rejected": ["at ceiling", "no gap"]},
                                             {"setting": "noisy", "rejected": []}]})
    text = protocol.markdown()
    assert "chosen on val, the ladder (easiest first): shipped; noisy. Rule: the first that fits." in text
    assert "- Tried on val: shipped: rejected (at ceiling; no gap).\n- Tried on val: noisy: **chosen**." in text
    fixed = Protocol(question="?", seeds=[0], selection_split="none", reported_split="test", selection="none.",
                     verdict_rule="rule.", difficulty_rule="fixed: the shipped data, because the gates suffice.")
    assert "- Difficulty of the data: fixed: the shipped data, because the gates suffice." in fixed.markdown()

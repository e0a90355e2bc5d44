"""The statistics every verdict rests on, on hand-computed cases: mean / range / standard error over seeds,
paired differences (and 'smaller than its standard error'), the seeds' agreement, the protocol's text."""

from __future__ import annotations

import math

import pytest

from lightning_moe.experiments.protocol import (Protocol, agreement, agreement_words, difference_words,
                                                paired_difference, seed_stat, spread)


def test_seed_stat_mean_range_and_standard_error():
    stat = seed_stat([0.5, 0.7, 0.9])
    # sample standard deviation 0.2, over sqrt(3)
    assert stat["mean"] == pytest.approx(0.7) and (stat["min"], stat["max"], stat["n"]) == (0.5, 0.9, 3)
    assert stat["sem"] == pytest.approx(0.2 / math.sqrt(3))
    assert seed_stat([0.4])["sem"] is None
    assert spread(stat) == "0.700 (0.500-0.900)" and spread(stat, 100, 1) == "70.0 (50.0-90.0)"
    assert spread(seed_stat([0.4])) == "0.400" and spread(None) == ""
    with pytest.raises(ValueError, match="no values"):
        seed_stat([])


def test_paired_difference_and_its_words():
    # a - b per seed: +0.1, +0.3, -0.1: mean 0.1, sd 0.2, standard error 0.115 > 0.1: within
    diff = paired_difference([0.6, 0.8, 0.4], [0.5, 0.5, 0.5])
    assert diff["mean"] == pytest.approx(0.1) and diff["sem"] == pytest.approx(0.2 / math.sqrt(3))
    assert (diff["above"], diff["below"], diff["within_se"]) == (2, 1, True)
    words = difference_words(diff, "MoLE - LoRA", 100, " points")
    assert words == ("MoLE - LoRA +10.000 points ± 11.547 points (standard error), higher in 2 of 3 seeds, lower in 1; "
                     "smaller than its standard error, so no difference is shown")
    # +0.3, +0.3, +0.2: clearly above
    clear = paired_difference([0.8, 0.8, 0.7], [0.5, 0.5, 0.5])
    assert not clear["within_se"] and "smaller than" not in difference_words(clear, "x")
    below = paired_difference([0.5, 0.5, 0.5], [0.8, 0.8, 0.7])  # as clearly below: its size, not its sign
    assert not below["within_se"] and (below["above"], below["below"]) == (0, 3)
    one = paired_difference([0.8], [0.5])
    assert one["sem"] is None and not one["within_se"] and "one seed, no standard error" in difference_words(one, "x")
    with pytest.raises(ValueError, match="2 against 1"):
        paired_difference([0.1, 0.2], [0.1])


def test_agreement_counts_the_seeds_that_give_the_majority_verdict():
    assert agreement(["not confirmed", "confirmed", "not confirmed"]) == ("not confirmed", 2, 3)
    assert agreement(["a", "b"]) == ("a", 1, 2)  # a tie: the first seen
    assert agreement_words(["x", "x", "x"]) == "**x** (3 of 3 seeds agree)"
    assert agreement_words(["x", "y", "x"]) == "**x** in 2 of 3 seeds (others: y: 1)"
    with pytest.raises(ValueError):
        agreement([])


def test_protocol_text_names_seeds_splits_rule_and_the_chosen_settings():
    protocol = Protocol(question="Q?", seeds=[0, 1, 2], selection_split="val", reported_split="test",
                        selection="the smallest rank that works.", verdict_rule="a rule.",
                        settings={"rank": 2, "steps": 300, "val_scores": [{"rank": 1}]})
    text = protocol.markdown()
    assert "Seeds: 0, 1, 2 (3)" in text and "chosen on the val split" in text and "the test split" in text
    assert "Chosen: rank = 2, steps = 300." in text and "val_scores" not in text  # lists stay in results.json
    assert protocol.as_dict()["settings"]["val_scores"] == [{"rank": 1}]

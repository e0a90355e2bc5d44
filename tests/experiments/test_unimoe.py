"""`python -m lightning_moe.experiments.unimoe --quick`: every run goes through, the table, routing numbers and
verdict are written; the verdict rules on hand-made numbers."""

from __future__ import annotations

import json

import pytest

from lightning_moe.experiments import unimoe


@pytest.mark.parametrize("means, expected", [
    # ahead of both in every seed, by more than the margin and the standard error
    ({"unimoe": [0.8, 0.82, 0.81], "copies": [0.7, 0.75, 0.72], "dense": [0.6, 0.7, 0.65]}, "confirmed"),
    # ahead of the copies on the mean (+9.5) but not beyond its standard error (10.5); the dense arm beaten
    ({"unimoe": [0.8, 0.7], "copies": [0.6, 0.71], "dense": [0.6, 0.6]}, "partly"),
    # both differences beyond their standard errors, but the copies ahead in one seed: not every seed
    ({"unimoe": [0.8, 0.8, 0.8], "copies": [0.7, 0.7, 0.81], "dense": [0.6, 0.6, 0.6]}, "partly"),
    # one seed: the margin alone decides
    ({"unimoe": [0.7], "copies": [0.69], "dense": [0.6]}, "partly"),
    ({"unimoe": [0.7], "copies": [0.69], "dense": [0.71]}, "not shown"),
    ({"unimoe": [0.72], "copies": [0.7], "dense": [0.7]}, "confirmed"),  # exactly the margin
    # large mean gains, each smaller than its standard error
    ({"unimoe": [0.9, 0.5], "copies": [0.5, 0.6], "dense": [0.5, 0.6]}, "not shown"),
])
def test_verdict_rules(means, expected):
    assert unimoe.verdict(means) == expected


@pytest.mark.slow  # the quick experiment, a Python process running stage 1 twice and every arm through the CLI
def test_quick_run_writes_results(quick_outputs):
    out = quick_outputs.get("unimoe")
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["accuracy"]) >= {"unimoe", "copies", "dense", "align_concat", "align_mean"}
    assert set(summary["accuracy"]["unimoe"]) == set(unimoe.DOMAINS)
    assert summary["verdict"] in ("confirmed", "partly", "not shown")
    assert summary["protocol"]["reported_split"] == "test" and summary["seeds"] == [0]
    # the Uni-MoE arm's modality x expert routing, in numbers: per MoE layer, each kind of token's shares sum to 1
    routing = summary["modality_routing"]["unimoe"]
    assert routing and all(set(shares) >= {"audio", "video"} for shares in routing.values()), routing
    for shares in routing.values():
        for row in shares.values():
            assert len(row) == 4 and sum(row) == pytest.approx(1.0)
    # stage 1 is trained once (OUT/base) and its rows are the same in every seed's summary
    assert (out / "base" / "models" / "align_concat").is_dir()
    text = (out / "results.md").read_text()
    for heading in ("## Protocol", "Verdict", "### Routing by modality", "### Video pooling", "Uni-MoE minus copies"):
        assert heading in text, heading

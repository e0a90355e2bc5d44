"""`python -m lightning_moe.experiments.unimoe --quick`: every run goes through, the table, routing numbers and
verdict are written (the verdict rules on hand-made numbers: tests/experiments/test_verdicts.py)."""

from __future__ import annotations

import json

import pytest

from lightning_moe.experiments import unimoe


@pytest.mark.slow  # the quick experiment, a Python process running stage 1 twice and every arm through the CLI
def test_quick_run_writes_results(quick_outputs):
    out = quick_outputs.get("unimoe")
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["accuracy"]) >= {"unimoe", "copies", "dense", "align_concat", "align_mean"}
    assert set(summary["accuracy"]["unimoe"]) == set(unimoe.DOMAINS)
    assert summary["verdict"].startswith("inconclusive")  # one seed: no interval
    assert [c["b"] for c in summary["protocol"]["comparisons"]] == ["copies", "dense", "single_stage"]
    # the single-stage arm: from the untrained model, everything trained, for as many steps as stages 1 to 3
    single, plan = summary["runs"]["single_stage"], summary["plan"]
    assert single["steps"] == plan["align_steps"] + 3 * plan["expert_steps"] + plan["steps"]
    assert single["params_trainable"] == single["params_total"] > summary["runs"]["unimoe"]["params_trainable"]
    assert 0 < summary["chance"] < 1
    # each stage-3 arm validated while training: its learning curve, over seeds in results.json
    assert set(summary["learning_curves"]) == set(unimoe.ARMS)
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

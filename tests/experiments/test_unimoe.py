"""`python -m lightning_moe.experiments.unimoe --quick`: every run goes through, the table and verdict are
written; the verdict rules on hand-made numbers."""

from __future__ import annotations

import json

import pytest

from lightning_moe.experiments import unimoe
from tests.conftest import ROOT

# the shipped audio/video data (data/media) and its DataModule options come with the data side of issue 14
media = pytest.mark.skipif(not (ROOT / "data/media/beeps/train.jsonl").is_file(),
                           reason="data/media (issue 14's data side) is not in this checkout yet")


def test_verdict_rules():
    assert unimoe.verdict({"unimoe": [0.8, 0.82], "copies": [0.7, 0.75], "dense": [0.6, 0.7]}) == "confirmed"
    # above both on the mean, but below the copies in one seed
    assert unimoe.verdict({"unimoe": [0.8, 0.7], "copies": [0.6, 0.71], "dense": [0.6, 0.6]}) == "partly"
    assert unimoe.verdict({"unimoe": [0.7], "copies": [0.69], "dense": [0.6]}) == "partly"
    assert unimoe.verdict({"unimoe": [0.7], "copies": [0.69], "dense": [0.71]}) == "not shown"
    assert unimoe.verdict({"unimoe": [0.72], "copies": [0.7], "dense": [0.7]}) == "confirmed"  # exactly the margin


@media
@pytest.mark.slow  # eight CLI runs, each decoding the audio clips at set-up: about 3.5 min on 2 busy cores
def test_quick_run_writes_results(tmp_path):
    written = unimoe.main(["--out", str(tmp_path), "--quick"])
    summary = json.loads((tmp_path / "results.json").read_text())
    assert set(summary["accuracy"]) >= {"unimoe", "copies", "dense", "align_concat", "align_mean"}
    assert set(summary["accuracy"]["unimoe"]) == set(unimoe.DOMAINS)
    assert summary["combined"]["verdict"] == written["combined"]["verdict"] in ("confirmed", "partly", "not shown")
    text = (tmp_path / "results.md").read_text()
    assert "Verdict" in text and "Video pooling" in text

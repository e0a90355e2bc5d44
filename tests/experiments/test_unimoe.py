"""`python -m lightning_moe.experiments.unimoe --quick`: every run goes through, the table, routing numbers and
verdict are written (the verdict rules on hand-made numbers: tests/experiments/test_verdicts.py)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import yaml

from lightning_moe.data.synthetic_media import MediaDifficulty, generate_media
from lightning_moe.experiments import RunResult, unimoe


@pytest.mark.slow  # the quick experiment, a Python process running stage 1 twice and every arm through the CLI
def test_quick_run_writes_results(quick_outputs):
    out = quick_outputs.get("unimoe")
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["accuracy"]) >= {"unimoe", "copies", "dense", "align_concat", "align_mean"}
    assert set(summary["accuracy"]["unimoe"]) == set(unimoe.DOMAINS)
    assert summary["verdict"].startswith("inconclusive")  # one seed: no interval
    assert [c["b"] for c in summary["protocol"]["comparisons"]] == ["copies", "dense", "single_stage"]
    # the single-stage arm: the MoE from the aligned model, its experts trained whole besides the router and LoRA,
    # for as many steps as stages 2 and 3 together
    single, plan, moe = summary["runs"]["single_stage"], summary["plan"], summary["runs"]["copies"]
    assert single["steps"] == 3 * plan["expert_steps"] + plan["steps"]
    assert moe["params_trainable"] < single["params_trainable"] < single["params_total"] == moe["params_total"]
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
    # the selection seed trains stage 1 with both poolings, the reported seed its own with concat, each in
    # OUT/base/stage1-<settings>/; the seed's arms start from its own, the pooling row is the selection seed's
    trained = sorted(p.name for p in (out / "base").glob("stage1-*/models/align_*"))
    assert trained == ["align_concat", "align_concat", "align_mean"]
    assert summary["runs"]["align_concat"]["seed"] == 0
    assert summary["runs"]["align_mean"]["seed"] == unimoe.QUICK.selection_seeds[0] != 0
    text = (out / "results.md").read_text()
    for heading in ("## Protocol", "Verdict", "### Routing by modality", "### Video pooling", "Uni-MoE minus copies"):
        assert heading in text, heading


def test_select_difficulty_trains_stage_1_per_rung_until_one_qualifies(tmp_path, monkeypatch):
    # three selection seeds, one per round. The shipped data: the first seed's stage 1 is at ceiling, which rejects
    # the rung whatever the others show, so they are not run there. pitch_ratio=2.0: seed 8's stage 1 learns nothing
    # of video (which domains it learns varies with the seed), so seed 9 is not run. pitch_ratio=1.5 qualifies
    plan = replace(unimoe.QUICK, difficulties=[None, {"pitch_ratio": 2.0}, {"pitch_ratio": 1.5}],
                   selection_seeds=[7, 8, 9])
    trained = []

    def stage1(at, base, poolings):
        trained.append((at.difficulty, at.seed, at.data_root, base, poolings))
        scores = {d: 1.0 if at.difficulty is None else 0.8 for d in unimoe.DOMAINS}
        if (at.difficulty, at.seed) == ({"pitch_ratio": 2.0}, 8):
            scores |= {d: 0.0 for d in unimoe.VIDEO}
        row = RunResult(name="align_concat", method="", stage="", steps=1, wall_s=0.0, step_time_s=None,
                        peak_memory_mb=None, memory_kind="", params_total=1, params_activated=1,
                        details={"val_curves": {f"val/{d}/exact_match": [[1, v]] for d, v in scores.items()}})
        return {"align_concat": row}

    monkeypatch.setattr(unimoe, "train_stage1", stage1)
    chosen = unimoe.select_difficulty(plan, tmp_path)
    generated = generate_media(tmp_path / "data", MediaDifficulty(pitch_ratio=1.5), seed=0, n_train=plan.data_train,
                               n_eval=plan.data_eval, pools=plan.data_pools)
    # stops at the first that qualifies, every seed measured there; video `mean` trained only there, at the first
    # selection seed (the pooling comparison)
    two, one_and_a_half = {"pitch_ratio": 2.0}, {"pitch_ratio": 1.5}
    assert [(t[0], t[1], t[4]) for t in trained] == [
        (None, 7, ("concat",)), (two, 7, ("concat",)), (two, 8, ("concat",)), (one_and_a_half, 7, ("concat",)),
        (one_and_a_half, 8, ("concat",)), (one_and_a_half, 9, ("concat",)), (one_and_a_half, 7, ("concat", "mean"))]
    assert trained[0][2] is None and trained[3][2] == str(generated) and trained[3][3] == tmp_path / "base"
    assert unimoe.stage1_directory(chosen["plan"], tmp_path / "base") != unimoe.stage1_directory(
        replace(chosen["plan"], difficulty=None), tmp_path / "base")
    assert chosen["met"] and chosen["plan"].data_root == str(generated) and chosen["plan"].discriminating
    not_run = "not run (a seed had already failed what every seed must meet)"
    assert chosen["tried"][0]["rejected"] == ["seed 7: stage 1 at ceiling on 6 of 6 domains (beeps, pitch, longer, "
                                              "frames, motion, beeps_shapes)", f"seed 8, 9 {not_run}"]
    assert chosen["tried"][1]["rejected"] == ["seed 8: stage 1 at chance on every video domain (frames, motion)",
                                              f"seed 9 {not_run}"]
    assert set(chosen["tried"][2]["val"]["chance"]) == set(unimoe.DOMAINS)  # each domain's majority answer on val
    assert set(chosen["tried"][2]["val"]["val"]) == {"7", "8", "9"}
    # the plan's data in the runs' configs: the media runs read it, the image expert keeps data/shapes
    config = yaml.safe_load(unimoe._config(chosen["plan"], tmp_path, "x", 4, {}, [], 0).read_text())
    assert config["data"]["init_args"]["root"] == str(generated)
    image = yaml.safe_load(unimoe._config(chosen["plan"], tmp_path, "y", 4, {}, [], 0, media=False).read_text())
    assert "root" not in image["data"]["init_args"]


def test_each_seed_trains_its_own_stage_1(tmp_path, monkeypatch):
    # every arm of a seed starts from that seed's stage 1: one trained once would hold the intervals over seeds to
    # one draw of it. A selection seed's (selection_seeds) is found again by its settings, not trained twice.
    trained = []

    class Started(Exception):
        pass

    def stage1(at, bases, poolings):
        trained.append((at.seed, bases, poolings))
        raise Started

    monkeypatch.setattr(unimoe, "train_stage1", stage1)
    with pytest.raises(Started):
        unimoe.run(tmp_path / "seed3", replace(unimoe.QUICK, seed=3), tmp_path / "base", {})
    assert trained == [(3, tmp_path / "base", ("concat",))]
    directories = {unimoe.stage1_directory(replace(unimoe.QUICK, seed=s), tmp_path) for s in (0, 3)}
    assert len(directories) == 2
    assert unimoe.stage1_directory(replace(unimoe.QUICK, seed=0, selection_seeds=[5]), tmp_path) in directories


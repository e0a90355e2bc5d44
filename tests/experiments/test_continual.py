"""`python -m lightning_moe.experiments.continual --quick` runs end to end and writes its results; the
continual verdict, diagnosis and rank-selection precision on hand-made numbers."""

from __future__ import annotations

import json

import pytest

from lightning_moe import experiments
from lightning_moe.experiments import continual
from lightning_moe.experiments.continual import METHODS


@pytest.mark.slow  # the quick continual experiment, a Python process running every arm through the CLI
def test_quick_continual_experiment_writes_results(quick_outputs):
    out = quick_outputs.get("continual")
    results = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in results["runs"]] == ["pretrain", *METHODS]
    methods = [r for r in results["runs"] if r["name"] != "pretrain"]
    for m in methods:
        d = m["details"]
        assert len(d["accuracy"]) == len(d["tasks"]) == 3 and all(len(row) == 3 for row in d["accuracy"])
        assert {"last", "avg", "transfer", "bwt", "forgetting"} <= set(d)
        assert (out / "figures" / f"{m['name']}_accuracy.png").is_file()
        assert (out / "logs" / f"{m['name']}_seed0.log").is_file()
    by_name = {m["name"]: m["details"] for m in methods}
    # MoRA holds three tasks' ranks (as many as a LoRA each); the task-specific oracle keeps three LoRAs; what
    # trains per task is one task's adapters and the shared connector, the same for every method
    lora = by_name["lora_sequential"]["adapter_params_total"]
    assert by_name["mora"]["adapter_params_total"] == 3 * lora == by_name["lora_task_specific"]["adapter_params_total"]
    assert len({d["adapter_params_per_task"] for d in by_name.values()}) == 1
    assert by_name["mora"]["adapter_params_per_task"] > lora  # the connector trains too
    assert by_name["mora"]["active_ranks_per_token"] <= 8  # the shipped budget top_k = 8
    # the task oracle's inputs activate only their own task's ranks: precision exactly 1 on every task
    oracle = results["rank_selection_precision"]["mora_task_oracle"]
    assert oracle == {"count": 1.0, "position_lr": 1.0, "position_tb": 1.0, "mean": 1.0}
    assert 0 <= results["rank_selection_precision"]["mora"]["mean"] <= 1
    assert results["protocol"]["seeds"] == [0] and results["verdict"] and results["diagnosis"]
    assert results["verdict"].startswith("inconclusive")  # one seed: no interval
    assert results["protocol"]["primary"].startswith("BWT") and results["protocol"]["comparisons"][0]["a"] == "mora"
    # every method trains its adapters and the shared connector: the oracle can forget through the connector
    assert all("--model.init_args.trainable=[adapters, connector]" in continual.method_run(m, True).args
               for m in METHODS)
    assert set(results["majority_answer"]) == {"count", "position_lr", "position_tb"}
    # the steps per task chosen on val first, with a selection seed apart from the reported one
    settings = results["protocol"]["settings"]
    assert settings["steps_per_task"] == 2 and len(settings["ladder"]) == 1
    assert set(settings["ladder"][0]["val"]) == {"1000"}
    assert (out / "selection" / "steps2" / "seed1000" / "logs" / "mora_seed1000.log").is_file()
    assert not (out / "selection" / "steps2" / "seed1000" / "logs" / "lora_joint_seed1000.log").exists()
    assert results["environment"]["torch_threads"] == 1
    table = (out / "results.md").read_text()
    assert "| mora |" in table and "acc[i, j]" in table and "1 threads" in table
    assert "## Protocol" in table and "rank-selection precision" in table and "Verdict" in table
    assert list((out / "runs/mora").glob("mora/version_*/events.*"))  # TensorBoard logs


def test_rank_selection_precision_is_the_share_of_own_task_ranks():
    tasks = ["a", "b", "c"]
    # task a's inputs: 2 of 4 active ranks from a's block; b: 3 of 3; c: 1 of 4; a task with no active ranks
    # is left out rather than counted as 0 or 1
    usage = {"a": [2.0, 1.0, 1.0], "b": [0.0, 3.0, 0.0], "c": [1.0, 2.0, 1.0]}
    assert continual.rank_selection_precision(usage, tasks) == pytest.approx(
        {"a": 0.5, "b": 1.0, "c": 0.25, "mean": 1.75 / 3})
    assert continual.rank_selection_precision({"a": [0.0, 0.0, 0.0], "b": [1.0, 1.0, 0.0]}, tasks) == \
        pytest.approx({"b": 0.5, "mean": 0.5})
    assert continual.rank_selection_precision(None, tasks) is None


def test_continual_combine_over_seeds_gives_last_avg_and_bwt_with_intervals():
    def summary(bwt_mora: float, bwt_seq: float, bwt_oracle: float) -> dict:
        tasks = ["a", "b"]
        runs = [{"name": "pretrain", "details": {}}]
        scores = {}
        for name, bwt in (("mora", bwt_mora), ("lora_sequential", bwt_seq), ("mora_task_oracle", bwt_oracle)):
            details = {"tasks": tasks, "last": 0.5, "avg": 0.6, "bwt": bwt, "forgetting": -bwt,
                       "accuracy": [[1.0, 0.0], [0.5, 1.0]]}
            runs.append({"name": name, "details": details})
            scores[name] = {"last": 0.5, "avg": 0.6, "bwt": bwt, "diagonal": [1.0, 1.0]}
        return {"runs": runs, "scores": scores, "rank_selection_precision": {"mora": {"mean": 0.4}},
                "majority_answer": {"a": 0.5, "b": 0.5}}

    # MoRA - sequential BWT per seed: 0, +0.02, -0.1: mean -0.027, interval [-0.18, +0.13] across the margin
    combined, text = continual.combine({0: summary(-0.5, -0.5, 0.0), 1: summary(-0.48, -0.5, 0.0),
                                        2: summary(-0.6, -0.5, -0.55)})
    diff = combined["differences"]["mora - lora_sequential"]["bwt"]
    assert diff["mean"] == pytest.approx(-0.08 / 3) and diff["above"] == 1 and diff["below"] == 1
    assert combined["differences"]["mora - lora_sequential"]["last"]["mean"] == 0.0
    assert combined["verdict"] == "inconclusive: the interval straddles the margin" and combined["gates"] == []
    assert combined["scores"]["mora"]["bwt"]["values"] == [-0.5, -0.48, -0.6]
    assert "| mora | 0.500 (0.500-0.500) | 0.600 (0.600-0.600) | -0.527 (-0.600--0.480) |" in text
    assert "Last mora - lora_sequential" in text and "Avg mora - lora_sequential" in text
    assert "Verdict on the paper's claim (MoRA forgets less than sequential LoRA): **inconclusive: the interval " \
           "straddles the margin**" in text


def test_the_protocol_declares_the_steps_ladder_and_its_rule_on_val():
    text = continual.protocol([0, 1]).markdown()
    assert "150 steps per task; 300 steps per task; 600 steps per task" in text
    assert "on val (each task's val split filling the accuracy matrix) and in every selection seed" in text
    assert "1000, 1001, 1002, 1003" in text and continual.NO_DISCRIMINATING_SETTING in text


def _val_scores(mora_tb: float = 0.9, bwt: float = -0.5) -> dict:
    """One selection seed's val scores: every task learnt by both arms except MoRA's position_tb as given."""
    chance = {"count": 0.25, "position_lr": 0.5, "position_tb": 0.5}
    return {"diagonal": {"lora_task_specific": [0.9, 0.9, 0.9], "mora": [0.9, 0.9, mora_tb]}, "bwt": bwt,
            "chance": chance}


def test_a_budget_qualifies_only_when_every_selection_seed_learns_every_task_and_sequential_lora_forgets():
    assert continual.selection_rejections({"1000": _val_scores(), "1001": _val_scores()}) == []
    # one seed of four at the majority answer on one task is enough to reject the budget: the edge the gate sits on
    missed = continual.selection_rejections({"1000": _val_scores(), "1001": _val_scores(mora_tb=0.52)})
    assert missed == ["MoRA does not learn position_tb in seed 1001"]
    assert continual.selection_rejections({"1000": _val_scores(bwt=-0.01)}) == [
        "sequential LoRA does not forget (mean BWT -0.010)"]


def test_select_steps_stops_a_budget_once_a_seed_does_not_learn_a_task(tmp_path, monkeypatch):
    # rounds of two seeds: at 150 steps seed 1001's MoRA misses position_tb, which rejects the budget whatever
    # seeds 1002 and 1003 show, so they are not run there; the mean BWT needs every seed: at 300 the first round's
    # does not forget enough, the four's does
    rounds = []

    def selection_seed(quick, steps, out, key, seed):  # at 300, seeds 1000 and 1001 alone forget too little
        return _val_scores(mora_tb=0.5 if (steps, seed) == (150, 1001) else 0.9,
                           bwt=-0.01 if steps == 300 and seed < 1002 else -0.2)

    def in_rounds(one_seed, seeds, jobs, threads):
        rounds.append((one_seed.args[1], list(seeds)))
        return {seed: one_seed(seed) for seed in seeds}

    monkeypatch.setattr(continual, "_selection_seed", selection_seed)
    monkeypatch.setattr(experiments, "map_seeds", in_rounds)  # what map_seeds_until runs each round
    chosen = continual.select_steps(tmp_path, False, [1000, 1001, 1002, 1003], jobs=2)
    assert rounds == [(150, [1000, 1001]), (300, [1000, 1001]), (300, [1002, 1003])]
    assert chosen["steps"] == 300 and chosen["met"] and not chosen["tried"][1]["rejected"]
    assert chosen["tried"][0]["rejected"] == [
        "MoRA does not learn position_tb in seed 1001",
        "seed 1002, 1003 not run (a seed had already failed what every seed must meet)"]


def test_select_steps_climbs_the_ladder_and_says_when_none_qualifies(tmp_path):
    measured = []

    def measure(rung):  # MoRA learns position_tb in every selection seed only from 300 steps on
        measured.append(rung["steps"])
        return {"1000": _val_scores(mora_tb=0.9 if rung["steps"] >= 300 else 0.5)}

    chosen = continual.select_steps(tmp_path, False, [1000], measure=measure)
    assert measured == [150, 300] and chosen["steps"] == 300 and chosen["met"]
    assert chosen["tried"][0]["rejected"] == ["MoRA does not learn position_tb in seed 1000"]
    never = continual.select_steps(tmp_path, False, [1000], measure=lambda rung: {"1000": _val_scores(mora_tb=0.5)})
    assert never["steps"] == 600 and not never["met"]
    # no qualifying budget: every verdict and the diagnosis are inconclusive, whatever the intervals say
    summaries = {s: {"scores": {m: {"last": 0.5, "avg": 0.5, "bwt": b, "diagonal": [0.9, 0.9, 0.9]} for m, b in
                                (("mora", -0.1 - s / 100), ("lora_sequential", -0.8), ("mora_task_oracle", 0.0))},
                     "tasks": ["count", "position_lr", "position_tb"]} for s in range(4)}
    chance = {"count": 0.25, "position_lr": 0.5, "position_tb": 0.5}
    assert continual.verdicts(summaries, chance)["verdict"] == "confirmed"
    decided = continual.verdicts(summaries, chance, met=False)
    assert decided["verdict"] == decided["diagnosis"] == f"inconclusive: {continual.NO_DISCRIMINATING_SETTING}"


def test_a_selection_seed_runs_the_rules_arms_on_val(tmp_path, monkeypatch):
    calls = []

    def fake_run(out, quick, methods, seed, steps, evaluate_on):
        calls.append((out, methods, seed, steps, evaluate_on))
        scores = {m: {"diagonal": [0.9, 0.8, 0.7], "bwt": -0.4} for m in methods}
        return {"scores": scores, "majority_answer": {"count": 0.25}}, ""

    monkeypatch.setattr(continual, "run", fake_run)
    key = {"git_commit": "abc", "command": "python -m lightning_moe.experiments.continual --out x", "threads": 1}
    entry = continual._selection_seed(False, 300, tmp_path, key, 1001)
    assert calls == [(tmp_path / "steps300" / "seed1001", continual.SELECTION_METHODS, 1001, 300, "val")]
    assert entry == {"diagonal": {"mora": [0.9, 0.8, 0.7], "lora_task_specific": [0.9, 0.8, 0.7]}, "bwt": -0.4,
                     "chance": {"count": 0.25}}
    # kept: the same command on the same commit takes the scores instead of training again; another key, or no
    # key (a dirty tree), trains
    assert continual._selection_seed(False, 300, tmp_path, key, 1001) == entry and len(calls) == 1
    continual._selection_seed(False, 300, tmp_path, {**key, "git_commit": "def"}, 1001)
    continual._selection_seed(False, 300, tmp_path, None, 1001)
    assert len(calls) == 3
    # the runs' command lines: the steps and the evaluated split reach the data module
    run = continual.method_run("mora", False, 1001, 300, "val")
    assert "--data.init_args.steps_per_task=300" in run.args and "--data.init_args.evaluate_on=val" in run.args

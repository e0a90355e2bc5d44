"""`python -m lightning_moe.experiments.continual --quick` runs end to end and writes its results; the
continual verdict, diagnosis and rank-selection precision on hand-made numbers."""

from __future__ import annotations

import json

import pytest

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


def test_the_protocol_declares_the_fixed_difficulty_and_why():
    text = continual.protocol([0, 1]).markdown()
    assert "- Difficulty of the data: fixed, the shipped data/shapes" in text and "no validation split" in text
    assert "chosen on val, the ladder" not in text

"""The data-conflict experiment's smoke version runs end to end through the CLI's classes and
writes its results, its per-run configs, adapters and TensorBoard logs; the base is reused."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from lightning_moe.experiments import RunResult, conflict
from tests.conftest import ROOT


def test_quick_conflict_experiment_writes_results_and_reuses_the_base(tmp_path):
    # as a user runs it, in its own process: the console shows the progress bar over the runs and the table,
    # not each run's Lightning warnings and set-up lines (those go to OUT/logs/)
    command = [sys.executable, "-m", "lightning_moe.experiments.conflict", "--out", "out", "--quick", "--threads", "1",
               "--seeds", "0"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    console = finished.stdout + finished.stderr
    assert finished.returncode == 0, console[-3000:]
    assert "args parameter is intended" not in console and "Seed set to" not in console
    assert "GPU available" not in console and "data report" not in console
    assert "conflict runs, seed 0" in console and "Verdict on the paper's claim" in finished.stdout
    out = tmp_path / "out"
    results = json.loads((out / "results.json").read_text())
    assert results["environment"]["torch_threads"] == 1
    names = [r["name"] for r in results["runs"]]
    domains = results["plan"]["domains"]
    assert names == ["base"] + [f"lora_{d}" for d in domains] + ["lora_mixture", "lora4x_mixture", "mole3_mixture"]
    runs = {r["name"]: r for r in results["runs"]}
    # trainable parameters: 4x rank = 4x LoRA parameters; MoLE between LoRA and E x LoRA on the MLPs
    assert runs["lora4x_mixture"]["params_trainable"] == 4 * runs["lora_mixture"]["params_trainable"]
    assert runs["lora_mixture"]["params_trainable"] < runs["mole3_mixture"]["params_trainable"] \
        < 3 * runs["lora_mixture"]["params_trainable"] + 10_000
    assert all({f"test/{d}/exact_match" for d in domains} <= set(r["metrics"]) for r in results["runs"])
    assert all(r["step_time_s"] > 0 for r in results["runs"])
    assert runs["lora_mixture"]["details"]["train_domains"] == domains and runs["lora_mixture"]["seed"] == 0
    # what the numbers depend on beside the plan
    env = results["environment"]
    assert env["torch_threads"] >= 1 and env["versions"]["torch"] and env["versions"]["lightning"]
    assert env["command"].startswith("python -m lightning_moe.experiments.conflict --out")
    assert "git_commit" in env
    assert results["verdict"] and results["verdict"] in (out / "results.md").read_text()
    assert set(results["majority_answer"]) == set(domains) and all(0.5 <= v <= 1 for v in results["majority_answer"].values())
    table = (out / "results.md").read_text()
    assert "| MoLE 3 experts r=1, mixture | mixture |" in table and "Verdict" in table
    assert "| majority answer (one constant answer) | - |" in table
    assert (out / "configs" / "mole3_mixture.yaml").is_file()
    # each run's own output went to its log, not to the console
    assert "Seed set to" in (out / "logs" / "lora_mixture_seed0.log").read_text()
    assert (out / "adapters" / "mole3_mixture" / "adapter_config.json").is_file()
    assert list((out / "tensorboard" / "mole3_mixture").glob("events.out.tfevents.*"))

    # a second invocation with the same base plan reuses the saved base instead of training it again
    base_weights = out / "base" / "model" / "model.safetensors"
    stamp = base_weights.stat().st_mtime_ns
    conflict.train_base(conflict.QUICK, out / "base", out)
    assert base_weights.stat().st_mtime_ns == stamp


# ---------------------------------------------------------------- the verdict on hand-written scores
# position_lr's shipped test split is 53% "left", position_tb's 51.5% "bottom" (the README's tables)
MAJORITY = {"count": 0.25, "position_lr": 0.53, "position_tb": 0.515}


def test_a_constant_answer_alone_is_no_conflict():
    # the seed-0 rank-1 run: LoRA alone gives the constant "left" (53%), on the mixture the constant "right"
    # (47%); the old rule (alone - mixture >= margin) called position_lr conflicted
    alone = {"count": 1.0, "position_lr": 0.53, "position_tb": 0.51}
    mixture = {"count": 1.0, "position_lr": 0.47, "position_tb": 0.485}
    assert conflict.learnt_domains(alone, MAJORITY) == ["count"]
    assert conflict.conflicted_domains(alone, mixture, MAJORITY) == []


def test_a_domain_learnt_alone_and_lost_on_the_mixture_is_conflicted():
    # the rank-2 run: position_lr 100% alone, 47% on the mixture; position_tb 60.5% alone, 48.5% mixed
    alone = {"count": 1.0, "position_lr": 1.0, "position_tb": 0.605}
    mixture = {"count": 1.0, "position_lr": 0.47, "position_tb": 0.485}
    assert conflict.conflicted_domains(alone, mixture, MAJORITY) == ["position_lr", "position_tb"]
    # learnt alone but not lost on the mixture: no conflict
    assert conflict.conflicted_domains(alone, {**mixture, "position_lr": 0.96}, MAJORITY) == ["position_tb"]


def test_the_margin_is_inclusive_on_both_conditions():
    margin = conflict.CONFLICT_MARGIN
    # exactly the margin above the majority answer and exactly the margin below alone: conflicted
    alone = {"position_lr": 0.58}  # 116 / 200
    assert conflict.conflicted_domains(alone, {"position_lr": 0.53}, MAJORITY, margin) == ["position_lr"]
    # one test sample (0.5 points) short on either condition: not
    assert conflict.conflicted_domains({"position_lr": 0.575}, {"position_lr": 0.40}, MAJORITY, margin) == []
    assert conflict.conflicted_domains(alone, {"position_lr": 0.535}, MAJORITY, margin) == []


def _row(name: str, accuracy: dict[str, float], step_s: float = 0.1) -> RunResult:
    return RunResult(name=name, method="LoRATuning", stage="", steps=1, wall_s=1.0, step_time_s=step_s,
                     peak_memory_mb=None, memory_kind="cpu_peak_rss", params_total=1, params_activated=1,
                     metrics={f"test/{d}/exact_match": v for d, v in accuracy.items()}, params_trainable=1, label=name,
                     details={"train_domains": list(accuracy)})


def test_summary_verdict_of_the_constant_answer_run_is_no_conflict():
    plan = conflict.Plan(domains=["count", "position_lr", "position_tb"], experts=[2])
    constant = {"count": 1.0, "position_lr": 0.47, "position_tb": 0.485}
    results = [_row("lora_count", {"count": 1.0, "position_lr": 0.0, "position_tb": 0.0}),
               _row("lora_position_lr", {"count": 0.275, "position_lr": 0.53, "position_tb": 0.0}),
               _row("lora_position_tb", {"count": 0.5, "position_lr": 0.0, "position_tb": 0.51}),
               _row("lora_mixture", constant), _row("lora4x_mixture", {**constant, "position_lr": 1.0}),
               _row("mole2_mixture", constant)]
    summary = conflict.summarise(plan, results, MAJORITY)
    assert summary["conflicted_domains"] == [] and summary["learnt_alone"] == ["count"]
    assert summary["verdict"].startswith("no conflict shown") and summary["recovered_share"]["lora4x"] is None
    table = conflict.markdown(summary)
    assert "| majority answer (one constant answer) | - | 25.0 | 53.0 | 51.5 |" in table
    # seed 1: position_lr learnt alone (100%), lost on the mixture (53%), MoLE wins nothing back, LoRA r=4 all
    results[1] = _row("lora_position_lr", {"count": 0.005, "position_lr": 1.0, "position_tb": 0.0})
    summary = conflict.summarise(plan, results, MAJORITY)
    assert summary["conflicted_domains"] == ["position_lr"]
    assert summary["recovered_share"]["lora4x"] == 1.0 and summary["recovered_share"]["mole2"] == 0.0
    assert summary["verdict"] == "not confirmed"


def test_majority_baseline_counts_normalised_answers_of_the_tested_samples(tmp_path):
    domain = tmp_path / "position_lr"
    domain.mkdir()
    answers = ["left", "Right.", "right", "left", "left", "left"]  # the first 4: right 2, left 2 -> 0.5
    domain.joinpath("test.jsonl").write_text("\n".join(
        json.dumps({"id": str(i), "conversations": [{"from": "human", "value": "Where?"}, {"from": "gpt", "value": a}]})
        for i, a in enumerate(answers)) + "\n")
    plan = conflict.Plan(domains=["position_lr"], eval_samples=4)
    assert conflict.majority_baselines(plan, tmp_path) == {"position_lr": 0.5}
    assert conflict.majority_baselines(conflict.Plan(domains=["position_lr"], eval_samples=6), tmp_path) == \
        {"position_lr": 4 / 6}

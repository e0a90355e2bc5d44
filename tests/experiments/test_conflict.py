"""The data-conflict experiment's smoke version runs end to end through the CLI's classes and
writes its results, its per-run configs, adapters and TensorBoard logs; the base is reused."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_moe.data.synthetic import ShapesDifficulty, generate_shapes
from lightning_moe import experiments
from lightning_moe.experiments import RunResult, conflict, val_at


@pytest.mark.slow  # the quick conflict experiment, a Python process running every arm through the CLI
def test_quick_conflict_experiment_writes_results_and_reuses_the_base(quick_outputs):
    # as a user runs it, in its own process: the console shows the progress bar over the runs and the table,
    # not each run's Lightning warnings and set-up lines (those go to OUT/logs/)
    out = quick_outputs.get("conflict")
    finished = quick_outputs.console("conflict")
    console = finished.stdout + finished.stderr
    assert "args parameter is intended" not in console and "Seed set to" not in console
    assert "GPU available" not in console and "data report" not in console
    assert "conflict runs, seed 0" in console and "Verdict on the paper's claim" in finished.stdout
    assert "choosing difficulty, rank and steps on val" in console
    results = json.loads((out / "results.json").read_text())
    assert results["environment"]["torch_threads"] == 1
    names = [r["name"] for r in results["runs"]]
    domains = results["plan"]["domains"]
    assert names == ["base"] + [f"lora_{d}" for d in domains] + ["lora_mixture", "lora4x_mixture", "mole3_mixture",
                                                                 "oracle_mixture"]
    runs = {r["name"]: r for r in results["runs"]}
    # trainable parameters: 4x rank = 4x LoRA parameters; MoLE between LoRA and E x LoRA on the MLPs
    assert runs["lora4x_mixture"]["params_trainable"] == 4 * runs["lora_mixture"]["params_trainable"]
    assert runs["lora_mixture"]["params_trainable"] < runs["mole3_mixture"]["params_trainable"] \
        < 3 * runs["lora_mixture"]["params_trainable"] + 10_000
    assert all({f"test/{d}/exact_match" for d in domains} <= set(r["metrics"]) for r in results["runs"])
    assert all(r["step_time_s"] > 0 for r in results["runs"])
    # every arm sees the same samples per domain in the same optimizer steps: a run on one of the D domains alone
    # takes a batch of batch / D
    plan = results["plan"]
    assert all(runs[f"lora_{d}"]["steps"] == plan["steps"] for d in domains)
    assert runs["lora_mixture"]["steps"] == runs["mole3_mixture"]["steps"] == plan["steps"]
    batches = {name: yaml.safe_load((out / "configs" / f"{name}.yaml").read_text())["data"]["init_args"]["batch_size"]
               for name in ("lora_position_lr", "lora_mixture")}
    assert batches == {"lora_position_lr": plan["batch_size"] // len(domains), "lora_mixture": plan["batch_size"]}
    # the learning curves: each run validated on val while training, averaged over seeds in results.json
    assert all(r["details"]["val_curves"]["val/exact_match"] for r in results["runs"])
    assert set(results["learning_curves"]) == set(names) - {"base"}
    # MoLE's cost from the interleaved benchmark, not from the runs' own step times
    assert set(results["cost"]["ratios"]) == {"mole3"} and results["cost"]["ratios"]["mole3"] > 0
    assert (out / "cost" / "results.json").is_file()
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
    # the protocol heads the results; the setting came from the val selection (one candidate in --quick)
    protocol = results["protocol"]
    assert protocol["seeds"] == [0] and protocol["selection_split"] == "val" and protocol["reported_split"] == "test"
    assert protocol["settings"]["rank"] == 1 and protocol["settings"]["ladder"][0]["steps"] == 4
    # --quick's one rung: the defaults generated at a tiny size under OUT/data, every adapter run on it
    root = Path(results["plan"]["data_root"])
    assert root.parent == out / "data" and results["plan"]["difficulty"] == {}
    assert json.loads((root / "settings.json").read_text())["n_train"] == conflict.QUICK.data_train
    assert yaml.safe_load((out / "configs" / "lora_mixture.yaml").read_text())["data"]["init_args"]["root"] == str(root)
    assert protocol["settings"]["difficulty"] == "generated, the defaults" and "Tried on val: generated" in table
    assert protocol["comparisons"][0]["a"] == "mole3_mixture" and protocol["primary"].startswith("mean test exact")
    assert table.startswith("## Protocol (declared before the runs)") and "Over 1 seed(s)" in table
    # the selection ran on the selection seeds (not the reported seed 0): alone on each domain, and the mixture
    assert list((out / "selection" / "configs").glob("select_d0_r1_s4_position_lr_seed1000.yaml"))
    assert list((out / "selection" / "configs").glob("select_d0_r1_s4_mixture_seed1000.yaml"))
    # the selection's alone runs on the pair validate at learnt_by of their steps (the rule reads that point: the
    # quick plan asks for half); the mixture run scores val once, at its end
    trainer = {name: yaml.safe_load((out / "selection" / "configs" / f"select_d0_r1_s4_{name}_seed1000.yaml")
                                    .read_text())["trainer"] for name in ("position_lr", "mixture")}
    assert trainer["position_lr"]["val_check_interval"] == 2 and trainer["mixture"]["limit_val_batches"] == 0
    early = protocol["settings"]["ladder"][0]["val"]["1000"]["alone_early"]
    assert set(early) == set(conflict.QUICK.pair) and all(0 <= v <= 1 for v in early.values())
    # Lightning logs the validations after steps 2 and 4 at steps 1 and 3; the rule read the first
    events = EventAccumulator(str(out / "selection" / "tensorboard" / "select_d0_r1_s4_position_lr_seed1000"),
                              size_guidance={"scalars": 0})
    events.Reload()
    curve = [(e.step, e.value) for e in events.Scalars("val/position_lr/exact_match")]
    assert [s for s, _ in curve] == [1, 3] and abs(early["position_lr"] - curve[0][1]) < 1e-6
    assert results["verdict"].startswith("inconclusive")  # one seed: no interval, whatever the gates say
    # the oracle sends every answer token of domain i to expert i, in every layer; the learnt router's shares
    # are measured on the same tokens (each row a distribution over the experts)
    oracle = runs["oracle_mixture"]["details"]["answer_routing"]
    assert oracle and all(shares[d] == [1.0 * (e == i) for e in range(len(domains))]
                          for shares in oracle.values() for i, d in enumerate(domains))
    learnt = runs["mole3_mixture"]["details"]["answer_routing"]
    assert all(abs(sum(v) - 1) < 1e-6 and len(v) == 3 for shares in learnt.values() for v in shares.values())
    assert runs["mole3_mixture"]["details"]["routing_entropy"]  # logged during training, read back
    assert "oracle-routed" in table and "Diagnosis" in table
    # each run's own output went to its log, not to the console
    assert "Seed set to" in (out / "logs" / "lora_mixture_seed0.log").read_text()
    assert (out / "adapters" / "mole3_mixture" / "adapter_config.json").is_file()
    assert list((out / "tensorboard" / "mole3_mixture").glob("events.out.tfevents.*"))

    # every seed, selection seeds included, trains its own base at its seed
    for seed in (0, *conflict.QUICK.selection_seeds):
        assert json.loads((out / "base" / f"seed{seed}" / "plan.json").read_text())["seed"] == seed
    assert runs["base"]["seed"] == 0
    # a second invocation with the same base plan reuses the saved base instead of training it again
    base_weights = out / "base" / "seed0" / "model" / "model.safetensors"
    stamp = base_weights.stat().st_mtime_ns
    conflict.train_base(conflict.QUICK, out / "base")
    assert base_weights.stat().st_mtime_ns == stamp


# ---------------------------------------------------------------- the verdict on hand-written scores
# hand-made majority-answer levels (the shipped position splits are exactly 50/50): a constant answer scores
# 53 % on position_lr and 51.5 % on position_tb here
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


def test_summary_of_the_constant_answer_run_shows_no_conflicted_domain():
    plan = conflict.Plan(domains=["count", "position_lr", "position_tb"], experts=[2])
    constant = {"count": 1.0, "position_lr": 0.47, "position_tb": 0.485}
    results = [_row("lora_count", {"count": 1.0, "position_lr": 0.0, "position_tb": 0.0}),
               _row("lora_position_lr", {"count": 0.275, "position_lr": 0.53, "position_tb": 0.0}),
               _row("lora_position_tb", {"count": 0.5, "position_lr": 0.0, "position_tb": 0.51}),
               _row("lora_mixture", constant), _row("lora4x_mixture", {**constant, "position_lr": 1.0}),
               _row("mole2_mixture", constant)]
    summary = conflict.summarise(plan, results, MAJORITY)
    assert summary["conflicted_domains"] == [] and summary["learnt_alone"] == ["count"]
    # the primary metric: the mean over every domain, for each mixture run and the per-domain upper bound
    assert summary["primary"] == pytest.approx({"lora_mixture": 1.955 / 3, "lora4x_mixture": 2.485 / 3,
                                                "mole2_mixture": 1.955 / 3, "upper_bound": 2.04 / 3})
    assert summary["primary_val"] == {}  # these rows were not validated while training
    table = conflict.markdown(summary)
    assert "| majority answer (one constant answer) | - | - | 25.0 | 53.0 | 51.5 | 43.2 | - |" in table
    # seed 1: position_lr learnt alone (100%), lost on the mixture (47%)
    results[1] = _row("lora_position_lr", {"count": 0.005, "position_lr": 1.0, "position_tb": 0.0})
    assert conflict.summarise(plan, results, MAJORITY)["conflicted_domains"] == ["position_lr"]


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


# ---------------------------------------------------------------- selection on val
def test_selection_rule_needs_the_upper_bound_to_learn_the_pair_in_every_seed_and_the_mixture_to_lose_on_average():
    domains, pair = ["count", "position_lr", "position_tb"], ["position_lr", "position_tb"]
    majority = {"count": 0.25, "position_lr": 0.5, "position_tb": 0.5}
    alone = {"count": 1.0, "position_lr": 0.9, "position_tb": 0.6}
    lost = {"count": 1.0, "position_lr": 0.5, "position_tb": 0.5}  # 0.1667 below the upper bound's mean
    seed = {"alone": alone, "alone_early": alone, "mixture": lost}
    assert conflict.rejections({0: seed, 1: seed}, majority, domains, pair) == []
    # a domain of the pair not learnt alone (by the end, the default) in one seed: the upper bound misses its target
    unlearnt = {**alone, "position_tb": 0.54}
    assert conflict.rejections({0: seed, 1: {**seed, "alone": unlearnt, "alone_early": unlearnt}}, majority,
                               domains, pair) == [
        "the upper bound has not learnt by the end of its steps position_tb (seed 1)"]
    # asked by half the steps: one seed learning later misses it, even when it has learnt by the end
    late = {**seed, "alone_early": {**alone, "position_tb": 0.54}}
    assert conflict.rejections({0: seed, 1: late}, majority, domains, pair, learnt_by=0.5) == [
        "the upper bound has not learnt by 50 % of its steps position_tb (seed 1)"]
    assert conflict.rejections({0: {**seed, "alone_early": {**alone, "position_tb": 0.55}}}, majority, domains,
                               pair) == []
    # the gap is a mean over the seeds: one seed whose mixture caught up does not reject the rung on its own
    # (0.1667 and 0.05: 0.108 on average), two do (0.1667, 0.05, 0.05: 0.089)
    caught_up = {**seed, "mixture": {**lost, "position_lr": 0.9, "position_tb": 0.45}}  # 0.05 below
    assert conflict.rejections({0: seed, 1: caught_up}, majority, domains, pair) == []
    assert conflict.rejections({0: seed, 1: caught_up, 2: caught_up}, majority, domains, pair) == [
        "plain LoRA on the mixture less than 10 points below the upper bound (mean over the seeds: +8.9 points)"]
    # the mixture loses less than the margin on the primary metric: the setting does not discriminate
    kept = {"count": 1.0, "position_lr": 0.9, "position_tb": 0.52}  # 0.08 / 3 = 0.0267 below: under 0.03
    assert conflict.rejections({0: {**seed, "mixture": kept}}, majority, domains, pair)
    assert conflict.rejections({}, majority, domains, pair) == ["no selection seed measured"]


def test_rejections_name_why_a_rung_fails_and_reject_the_mixture_at_ceiling_but_not_the_upper_bound():
    domains, pair = ["count", "position_lr", "position_tb"], ["position_lr", "position_tb"]
    majority = {"count": 0.25, "position_lr": 0.5, "position_tb": 0.5}
    lost = {"count": 1.0, "position_lr": 0.5, "position_tb": 0.5}
    # every domain learnt to 100 % alone: the oracle reaching its target perfectly is no fault
    perfect = {d: 1.0 for d in domains}
    assert conflict.rejections({"1000": {"alone": perfect, "alone_early": perfect, "mixture": lost}}, majority,
                               domains, pair) == []
    # the compared arm at ceiling is (and then it loses nothing either)
    assert conflict.rejections({"1000": {"alone": perfect, "alone_early": perfect, "mixture": perfect}}, majority,
                               domains, pair) == [
        "plain LoRA on the mixture less than 10 points below the upper bound (mean over the seeds: +0.0 points)",
        "plain LoRA on the mixture at ceiling (100.0 %)"]
    # the mixture at chance on every domain (the majority answer's mean, 41.7 %)
    at_chance = {"1000": {"alone": {"count": 0.9, "position_lr": 0.9, "position_tb": 0.9},
                          "alone_early": {"position_lr": 0.9, "position_tb": 0.9}, "mixture": majority}}
    assert conflict.rejections(at_chance, majority, domains, pair) == [
        "plain LoRA on the mixture at or below chance (41.7 %, chance 41.7 %)"]
    # exactly 10 points below the upper bound counts (float rounding aside); a sample less does not
    alone = {"count": 0.9, "position_lr": 0.9, "position_tb": 0.9}
    exactly = {"count": 0.9, "position_lr": 0.75, "position_tb": 0.75}  # 0.30 / 3 = 0.10
    assert conflict.rejections({"7": {"alone": alone, "alone_early": alone, "mixture": exactly}}, majority, domains,
                               pair) == []
    short = {**exactly, "position_tb": 0.755}
    assert conflict.rejections({"7": {"alone": alone, "alone_early": alone, "mixture": exactly},
                                "8": {"alone": alone, "alone_early": alone, "mixture": short}},
                               majority, domains, pair) == [
        "plain LoRA on the mixture less than 10 points below the upper bound (mean over the seeds: +9.9 points)"]
    unlearnt = {**alone, "position_tb": 0.54}
    assert conflict.rejections({"7": {"alone": unlearnt, "alone_early": unlearnt, "mixture": exactly}}, majority,
                               domains, pair, learnt_by=0.25)[0] == \
        "the upper bound has not learnt by 25 % of its steps position_tb (seed 7)"
    assert conflict.rejections({}, majority, domains, pair) == ["no selection seed measured"]


def test_select_setting_climbs_the_ladder_to_the_first_qualifying_rung_on_generated_data(tmp_path):
    # two difficulties (the shipped data, then pixel noise generated at a tiny size), two budgets each
    plan = conflict.Plan(difficulties=[None, {"pixel_noise": 30}], candidates=[[1, 300], [2, 300]], val_samples=8,
                         selection_seeds=[7, 8], data_train=64, data_eval=8)
    calls = []

    def measure(at: conflict.Plan) -> dict[int, dict[str, dict[str, float]]]:
        calls.append((at.difficulty, at.rank, at.steps, at.data_root))
        majority = conflict.majority_baselines(at, split="val")
        learnt = {d: min(0.95, majority[d] + 0.3) for d in at.domains}
        # the shipped data: position_tb not learnt alone, at either rank; noisy data, rank 1: the mixture learns as
        # much as the upper bound (no conflict); rank 2: it loses the pair
        if at.difficulty is None:
            learnt = {**learnt, "position_tb": majority["position_tb"]}
        mixture = learnt if at.rank == 1 and at.difficulty else {**learnt, **{d: majority[d] for d in at.pair}}
        return {s: {"alone": learnt, "alone_early": learnt, "mixture": mixture} for s in at.selection_seeds}

    chosen = conflict.select_setting(plan, tmp_path / "unused", tmp_path / "out" / "selection", measure)
    generated = generate_shapes(tmp_path / "out" / "data", ShapesDifficulty(pixel_noise=30), seed=0, n_train=64,
                                n_eval=8)
    # every rung in order, up to the first that qualifies
    assert [c[:3] for c in calls] == [(None, 1, 300), (None, 2, 300), ({"pixel_noise": 30}, 1, 300),
                                      ({"pixel_noise": 30}, 2, 300)]
    assert calls[0][3] is calls[1][3] is None and calls[2][3] == calls[3][3] == str(generated)  # generated once
    assert chosen["met"] and (chosen["plan"].rank, chosen["plan"].steps) == (2, 300)
    assert chosen["plan"].difficulty == {"pixel_noise": 30} and chosen["plan"].data_root == str(generated)
    assert json.loads((generated / "settings.json").read_text())["difficulty"]["pixel_noise"] == 30
    tried = chosen["tried"]
    assert tried[0]["rejected"] == tried[1]["rejected"] == [
        "the upper bound has not learnt by the end of its steps position_tb (seed 7), position_tb (seed 8)"]
    assert tried[2]["rejected"][0].startswith("plain LoRA on the mixture less than 10 points") and not tried[3]["rejected"]
    assert set(tried[0]["val"]) == {"7", "8"} and tried[3]["setting"] == "generated, pixel_noise=30, rank 2, 300 steps"
    # the same plan again: the same data directory, not a second set
    again = conflict.select_setting(plan, tmp_path / "unused", tmp_path / "out" / "selection", measure)
    assert again["plan"].data_root == str(generated)
    assert [p.name for p in (tmp_path / "out" / "data").iterdir() if not p.name.startswith(".")] == [generated.name]


def test_select_setting_stops_a_rung_once_a_seed_fails_what_every_seed_must_meet(tmp_path, monkeypatch):
    # seeds in rounds of `jobs`. Pixel noise, rank 1: seed 8 has not learnt position_tb by half the steps, which
    # rejects the rung whatever seed 9 shows, so seed 9 is not run there. Rank 2: seeds 7 and 8's mixtures as good
    # as the upper bound, a condition on the mean over the seeds, so the rung is measured in full (and rejected).
    # Distractors, rank 1: the mixture at chance (the majority answer everywhere), again a mean, and only the
    # last round's seed 9 learnt late: measured in full, rejected for both. Rank 2 qualifies in all three seeds
    plan = conflict.Plan(difficulties=[{"pixel_noise": 30}, {"distractors": 1}], candidates=[[1, 300], [2, 300]],
                         val_samples=8, selection_seeds=[7, 8, 9], data_train=64, data_eval=8, learnt_by=0.5)
    rounds = []

    def selection_seed(at, bases, reuse, out, key, seed):
        majority = conflict.majority_baselines(at, split="val")
        learnt = {d: min(0.95, majority[d] + 0.3) for d in at.domains}
        noisy = "pixel_noise" in at.difficulty
        late = (at.rank, seed) == ((1, 8) if noisy else (1, 9))
        early = {**learnt, "position_tb": majority["position_tb"]} if late else learnt
        mixture = {**learnt, **{d: majority[d] for d in at.pair}}
        if noisy and at.rank == 2 and seed in (7, 8):
            mixture = learnt  # caught up
        elif not noisy and at.rank == 1:
            mixture = majority  # at chance
        return {"alone": learnt, "alone_early": early, "mixture": mixture}

    def in_rounds(one_seed, seeds, jobs, threads):
        at = one_seed.args[0]
        rounds.append((next(iter(at.difficulty)), at.rank, list(seeds)))
        return {seed: one_seed(seed) for seed in seeds}

    monkeypatch.setattr(conflict, "_kept_selection_seed", selection_seed)
    monkeypatch.setattr(experiments, "map_seeds", in_rounds)  # what map_seeds_until runs each round
    chosen = conflict.select_setting(plan, tmp_path / "bases", tmp_path / "out" / "selection", jobs=2)
    assert rounds == [("pixel_noise", 1, [7, 8]), ("pixel_noise", 2, [7, 8]), ("pixel_noise", 2, [9]),
                      ("distractors", 1, [7, 8]), ("distractors", 1, [9]), ("distractors", 2, [7, 8]),
                      ("distractors", 2, [9])]
    tried = chosen["tried"]
    assert tried[0]["rejected"] == [
        "the upper bound has not learnt by 50 % of its steps position_tb (seed 8)",
        "seed 9 not run (a seed had already failed what every seed must meet)"]
    assert len(tried[1]["rejected"]) == 1 and tried[1]["rejected"][0].startswith(
        "plain LoRA on the mixture less than 10 points below the upper bound (mean over the seeds")
    assert tried[2]["rejected"][0] == "the upper bound has not learnt by 50 % of its steps position_tb (seed 9)"
    assert tried[2]["rejected"][1].startswith("plain LoRA on the mixture at or below chance") and len(
        tried[2]["rejected"]) == 2
    assert chosen["met"] and chosen["plan"].difficulty == {"distractors": 1} and chosen["plan"].rank == 2
    assert set(tried[3]["val"]) == {"7", "8", "9"} and len(tried) == 4
    rounds.clear()
    conflict.select_setting(plan, tmp_path / "bases", tmp_path / "out" / "selection", jobs=1)
    assert [r[1:] for r in rounds] == [(1, [7]), (1, [8]), (2, [7]), (2, [8]), (2, [9]), (1, [7]), (1, [8]),
                                       (1, [9]), (2, [7]), (2, [8]), (2, [9])]


def test_select_setting_without_a_qualifying_rung_runs_the_last_and_every_verdict_is_inconclusive(tmp_path):
    plan = conflict.Plan(difficulties=[None], candidates=[[1, 300], [1, 600]], selection_seeds=[7])
    flat = {d: 0.9 for d in plan.domains}
    nothing = conflict.select_setting(plan, tmp_path, tmp_path / "selection",
                                      lambda at: {7: {"alone": flat, "alone_early": flat, "mixture": flat}})
    assert (nothing["plan"].rank, nothing["plan"].steps, nothing["met"]) == (1, 600, False)  # the last, flagged
    assert all(t["rejected"] for t in nothing["tried"]) and len(nothing["tried"]) == 2
    declared = conflict.protocol(replace(nothing["plan"], discriminating=False), [0, 1], "on val.")
    declared.settings = {"ladder": nothing["tried"]}
    text = declared.markdown()
    assert "Tried on val: the shipped data/shapes, rank 1, 300 steps: rejected (plain LoRA on the mixture less" in text
    assert "**chosen**" not in text and "no discriminating setting" in text


def test_the_plan_names_its_generated_data_root_in_every_run_config(tmp_path):
    plan = conflict.with_data(conflict.Plan(data_train=64, data_eval=8), {"distractors": 1}, tmp_path / "data")
    assert plan.data_root == str(conflict.with_data(plan, {"distractors": 1}, tmp_path / "data").data_root)
    config = conflict._data_config(plan, ["position_lr"], seed=0)
    assert config["init_args"]["root"] == plan.data_root
    assert "root" not in conflict._data_config(conflict.Plan(), ["position_lr"], seed=0)["init_args"]
    with pytest.raises(ValueError, match="holds no position_tb"):
        conflict.with_data(conflict.Plan(), {"conventions": 1}, tmp_path / "data")


def test_val_at_reads_the_last_validation_logged_by_a_step():
    # validations after 150 and 300 steps, which Lightning logs at steps 149 and 299 (as the runs' curves hold them)
    run = RunResult(name="r", method="m", stage="", steps=300, wall_s=0.0, step_time_s=0.0, peak_memory_mb=0.0,
                    memory_kind="", params_total=0, params_activated=0, details={
                        "val_curves": {"val/position_lr/exact_match": [[149, 0.5], [299, 0.95]]}})
    assert val_at(run, "position_lr", 150) == val_at(run, "position_lr", 299) == 0.5
    assert val_at(run, "position_lr", 300) == 0.95
    assert val_at(run, "position_lr", 149) is None and val_at(run, "position_tb", 300) is None
    # a validation after every step (steps 1 and 2, logged at 0 and 1): after step 1 only the first
    every = replace(run, details={"val_curves": {"val/position_lr/exact_match": [[0, 0.25], [1, 0.75]]}})
    assert val_at(every, "position_lr", 1) == 0.25


def test_a_selection_seed_is_kept_and_taken_again_under_the_same_key(tmp_path, monkeypatch):
    calls = []

    def fake_seed(at, bases, reuse, out, seed):
        calls.append((at.difficulty, at.rank, at.steps, seed))
        return {"alone": {"position_lr": 0.9}, "alone_early": {"position_lr": 0.6}, "mixture": {"position_lr": 0.5}}

    monkeypatch.setattr(conflict, "_selection_seed", fake_seed)
    plan = replace(conflict.Plan(), difficulty={"pixel_noise": 30}, rank=2, steps=600)
    key = {"git_commit": "abc", "command": "python -m lightning_moe.experiments.conflict --out x", "threads": 1}
    first = conflict._kept_selection_seed(plan, tmp_path / "base", None, tmp_path, key, 1001)
    assert (tmp_path / "kept" / "d1_r2_s600_seed1001.json").is_file() and not list((tmp_path / "kept").glob("*.partial"))
    assert conflict._kept_selection_seed(plan, tmp_path / "base", None, tmp_path, key, 1001) == first
    assert calls == [({"pixel_noise": 30}, 2, 600, 1001)]
    # another rung, another key or none (a dirty tree): measured
    conflict._kept_selection_seed(replace(plan, steps=300), tmp_path / "base", None, tmp_path, key, 1001)
    conflict._kept_selection_seed(plan, tmp_path / "base", None, tmp_path, {**key, "threads": 2}, 1001)
    conflict._kept_selection_seed(plan, tmp_path / "base", None, tmp_path, None, 1001)
    assert len(calls) == 4

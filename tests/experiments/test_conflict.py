"""The data-conflict experiment's smoke version runs end to end through the CLI's classes and
writes its results, its per-run configs, adapters and TensorBoard logs; the base is reused."""

from __future__ import annotations

import json

import pytest

from lightning_moe.experiments import RunResult, conflict


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
    assert "choosing rank and steps on val" in console
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
    assert protocol["settings"]["rank"] == 1 and protocol["settings"]["val_scores"][0]["steps"] == 3
    assert table.startswith("## Protocol (declared before the runs)") and "Over 1 seed(s)" in table
    assert list((out / "selection" / "configs").glob("select_r1_s3_position_lr_seed0.yaml"))
    assert results["verdict_agreement"] == [results["verdict"], 1, 1]
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


# ---------------------------------------------------------------- diagnosis, selection on val, seeds
def _shares(oracle: float | None, moles: dict[str, float | None], conflicted: bool = True) -> dict:
    shares = {"lora4x": 0.0, **moles, **({} if oracle is None else {"oracle": oracle})}
    return {"recovered_share": shares, "conflicted_domains": ["position_lr"] if conflicted else []}


@pytest.mark.parametrize("oracle, moles, expected", [
    (0.9, {"mole2": 0.1, "mole3": 0.3}, "router"),  # routed by domain it works, learnt routers do not
    (0.5, {"mole2": 0.49}, "router"),  # the oracle at exactly half: inclusive
    (0.1, {"mole2": 0.0}, "capacity"),  # even routed by domain the experts do not hold both
    (0.3, {"mole2": 0.0}, "partly router, partly capacity"),
    (0.2, {"mole2": 0.0}, "partly router, partly capacity"),  # a fifth is not 'capacity'
    (0.9, {"mole2": 0.6}, "no failure to diagnose"),
    (None, {"mole2": 0.1}, "no diagnosis"),
])
def test_conflict_diagnosis_router_or_capacity(oracle, moles, expected):
    assert conflict.diagnosis(_shares(oracle, moles)).split(":")[0] == expected


def test_conflict_diagnosis_without_a_conflict_and_in_the_summary():
    assert conflict.diagnosis(_shares(0.9, {"mole2": 0.1}, conflicted=False)).startswith("nothing to diagnose")
    # through summarise: the oracle run enters the recovered shares and the diagnosis, not the verdicts
    plan = conflict.Plan(domains=["position_lr"], experts=[2])
    results = [_row("lora_position_lr", {"position_lr": 1.0}), _row("lora_mixture", {"position_lr": 0.5}),
               _row("lora4x_mixture", {"position_lr": 0.5}), _row("mole2_mixture", {"position_lr": 0.55}),
               _row("oracle_mixture", {"position_lr": 0.95})]
    summary = conflict.summarise(plan, results, {"position_lr": 0.5})
    assert summary["recovered_share"] == pytest.approx({"lora4x": 0.0, "mole2": 0.1, "oracle": 0.9})
    assert list(summary["verdicts"]) == ["mole2"] and summary["verdict"] == "not confirmed"
    assert summary["diagnosis"].startswith("router: routed by domain, the experts win back 90%")
    assert "Diagnosis (oracle-routed MoLE against the learnt routers): router" in conflict.markdown(summary)


def test_selection_rule_needs_every_domain_of_the_pair_in_every_seed():
    pair, majority = ["position_lr", "position_tb"], {"position_lr": 0.5, "position_tb": 0.5}
    both = {"position_lr": 0.9, "position_tb": 0.6}
    assert conflict.learns_everywhere({0: both, 1: both}, majority, pair)
    assert not conflict.learns_everywhere({0: both, 1: {**both, "position_tb": 0.54}}, majority, pair)
    assert conflict.learns_everywhere({0: {**both, "position_tb": 0.55}}, majority, pair)  # the margin, inclusive
    assert not conflict.learns_everywhere({}, majority, pair)


def test_select_setting_takes_the_first_candidate_that_meets_the_rule_on_val(tmp_path):
    plan = conflict.Plan(candidates=[[1, 300], [2, 300], [1, 600]], val_samples=200)
    majority = conflict.majority_baselines(plan, split="val", domains=plan.pair)
    learnt, constant = {d: majority[d] + 0.3 for d in plan.pair}, dict(majority)
    calls = []

    def measure(rank: int, steps: int) -> dict[int, dict[str, float]]:
        calls.append((rank, steps))
        # rank 1 learns position_tb in seed 0 only; rank 2 learns both in both seeds
        if rank == 1:
            return {0: learnt, 1: {**learnt, "position_tb": constant["position_tb"]}}
        return {0: learnt, 1: learnt}

    chosen = conflict.select_setting(plan, [0, 1], tmp_path / "unused", tmp_path, measure)
    assert (chosen["rank"], chosen["steps"], chosen["met"]) == (2, 300, True)
    assert calls == [(1, 300), (2, 300)]  # stops at the first that meets the rule
    assert [t["met"] for t in chosen["tried"]] == [False, True]
    nothing = conflict.select_setting(plan, [0], tmp_path, tmp_path, lambda r, s: {0: constant})
    assert (nothing["rank"], nothing["steps"], nothing["met"]) == (1, 600, False)  # the last, flagged


def _seed_summary(mixture_lr: float, mole_lr: float, oracle_lr: float) -> dict:
    plan = conflict.Plan(domains=["count", "position_lr"], experts=[2], pair=["position_lr"])
    results = [_row("lora_count", {"count": 1.0, "position_lr": 0.0}),
               _row("lora_position_lr", {"count": 0.0, "position_lr": 1.0}),
               _row("lora_mixture", {"count": 1.0, "position_lr": mixture_lr}),
               _row("lora4x_mixture", {"count": 1.0, "position_lr": mixture_lr}),
               _row("mole2_mixture", {"count": 1.0, "position_lr": mole_lr}),
               _row("oracle_mixture", {"count": 1.0, "position_lr": oracle_lr})]
    return conflict.summarise(plan, results, {"count": 0.25, "position_lr": 0.5})


def test_conflict_over_seeds_counts_agreement_and_reports_differences_within_their_standard_error():
    # MoLE: +0.05, -0.05, +0.30 against the mixture (lost 0.5 each seed): 10%, -10%, 60% won back
    summaries = {0: _seed_summary(0.5, 0.55, 1.0), 1: _seed_summary(0.5, 0.45, 1.0), 2: _seed_summary(0.5, 0.8, 0.9)}
    combined, text = conflict.combine(summaries)
    assert combined["verdict_per_seed"] == ["not confirmed", "not confirmed", "confirmed"]
    assert combined["verdict_agreement"] == ["not confirmed", 2, 3]
    assert combined["diagnosis_agreement"] == ["router", 2, 3]
    mole = combined["difference_vs_lora_mixture"]["mole2_mixture"]
    assert mole["mean"] == pytest.approx(0.1) and (mole["above"], mole["below"]) == (2, 1)
    assert mole["within_se"]  # 0.1 against a standard error of 0.104
    assert not combined["difference_vs_lora_mixture"]["oracle_mixture"]["within_se"]
    assert combined["accuracy"]["mole2_mixture"]["position_lr"]["values"] == [0.55, 0.45, 0.8]
    assert "| mole2_mixture | 100.0 (100.0-100.0) | 60.0 (45.0-80.0) |" in text
    assert "**not confirmed** in 2 of 3 seeds (others: confirmed: 1)" in text
    assert "smaller than its standard error" in text

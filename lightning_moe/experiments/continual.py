"""Does MoRA reduce forgetting in continual instruction tuning? MoRA against plain-LoRA baselines.

    python -m lightning_moe.experiments.continual --out DIR [--quick] [--seeds 0 1 ...] [--jobs N] [--threads N]
        [--methods ...]

1. A short dense pre-training of the tiny model on `colour` (`configs/mora/pretrain.yaml`), the base
   every run below starts from (a tiny preset has no pretrained vision tower, so adapters alone on
   a random model would learn little).
2. The steps per task, chosen on val (`select_steps`, in DIR/selection/, with the selection seeds, apart from
   the reported ones): the first rung of `STEP_LADDER` (cheapest first) at which, in every selection seed,
   MoRA and the upper bound (task-specific LoRA) learn every task and sequential LoRA forgets
   (`selection_rejections`), each task's val split filling the accuracy matrix (`evaluate_on: val`). A
   position task is learnt in a sudden step that some seeds miss at too few steps, and a verdict whose gate
   sits on that edge moves with the float order.
3. The task sequence of `configs/mora/continual.yaml` (count -> position_lr -> position_tb), each
   method for the chosen steps per task, evaluating every task's test split after each task:
   - `mora`: MoRA rank-1 experts, new ranks per task, earlier ranks frozen;
   - `lora_sequential`: one plain LoRA trained task after task (forgetting expected);
   - `lora_joint`: one LoRA on the mixture of all tasks (the multi-task reference);
   - `lora_task_specific`: a LoRA per task, selected by the given task id (the upper bound);
   - `mora_task_oracle`: MoRA whose inputs activate only their own task's ranks (task id given): perfect
     rank selection, so that MoRA's forgetting splits into selection failure and interference.
   Every method trains its adapters and the image connector (`SHARED`): the connector is shared by all
   tasks, so a later task can disturb an earlier one even under perfect rank selection. With adapters
   alone, the oracle's earlier tasks would see exactly the frozen ranks and frozen base they were
   evaluated with, and its BWT would be 0 by construction: an oracle that cannot fail measures nothing.

Rank-selection precision: the share of a task's active ranks (after the last task, on its test inputs)
that belong to its own task's block (1 = perfect selection). Protocol: `protocol()`; the verdict and
diagnosis over seeds (`verdicts`, from paired intervals, `statistics.decide`): the primary metric is BWT,
reported beside Last and Avg (a method that learns nothing forgets nothing: the gates catch it).

Every run goes through `lightning_moe.cli.main` with the shipped configs and command-line
overrides (no second training loop). The runs work inside DIR (relative `runs/...` paths of the
configs land there; shipped data paths fall back to the repository or the installed package), so
DIR also holds the TensorBoard logs (`DIR/runs/mora/<method>`) and each run's console output
(`DIR/logs/`). Writes `DIR/results.json` and `DIR/results.md`: the accuracy matrices,
Last / Avg / Transfer / BWT / forgetting per method, adapter parameters, active ranks per token,
and the accuracy matrices as figures (`DIR/figures/<method>_accuracy.png`). Several seeds: each
seed's runs in DIR/seed<N>/. `--quick` is the smoke version the tests run (a few steps, few samples).
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .. import plots
from ..metrics import accuracy_table, continual_scores
from ..paths import resolve_data_path, shipped_path
from . import (Run, RunResult, command_line, environment, execute, experiment_parser, kept, majority_answers,
               map_seeds_until, not_run, parse_args, progress, resume_key, run_seeds, working_directory)
from .protocol import NO_DISCRIMINATING_SETTING, SELECTION_SEEDS, Comparison, Protocol, select_first
from .statistics import (CONFIRMED, INCONCLUSIVE, NOT_CONFIRMED, decide, difference_words, learnt_over_seeds,
                         learnt_words, paired_difference, seed_stat, spread)

DATA_ROOT = "data/shapes"  # the continual tasks are shipped shapes domains
PRETRAIN = "configs/mora/pretrain.yaml"  # shipped_path names them in a checkout or an installed package
CONTINUAL = "configs/mora/continual.yaml"
LORA = ["--model=lightning_moe.methods.ContinualLoRA"]
# what every method trains: its adapters and the connector all tasks share (the module docstring: why)
SHARED = ["--model.init_args.trainable=[adapters, connector]"]
# method -> overrides of configs/mora/continual.yaml (same data, steps, targets, rank and optimizer)
METHODS: dict[str, list[str]] = {
    "mora": [],
    "lora_sequential": [*LORA, "--model.init_args.strategy=sequential"],
    "lora_joint": [*LORA, "--model.init_args.strategy=joint", "--data.init_args.schedule=joint"],
    "lora_task_specific": [*LORA, "--model.init_args.strategy=task_specific"],
    # MoRA with perfect rank selection: each task's inputs activate only that task's ranks (task id given)
    "mora_task_oracle": ["--model.init_args.mora.task_oracle=true"],
}
# the primary comparison's margin: a BWT gain under 5 points (about two standard errors of an accuracy near 80%
# on 200 samples) does not count as forgetting less
BWT_MARGIN = 0.05
# a method "learns" a task when its accuracy right after training it is this far above the majority answer
LEARNT_MARGIN = 0.05
TOLERANCE = 1e-9
# the steps per task `select_steps` tries on val, cheapest first (configs/mora/continual.yaml's 150 first)
STEP_LADDER = [150, 300, 600]
QUICK_STEP_LADDER = [2]
# four selection seeds, as the conflict experiment's: a position task learnt in a sudden step that some seeds miss
# needs more than three passing seeds to say something of ten reported ones
CONTINUAL_SELECTION_SEEDS = [*SELECTION_SEEDS, max(SELECTION_SEEDS) + 1]
SELECTION_METHODS = ["mora", "lora_task_specific", "lora_sequential"]  # the arms the selection rule reads
COMMON = ["--trainer.enable_progress_bar=false"]
# smoke version: a few steps and samples; the shipped test files double as small train files
QUICK_PRETRAIN = ["--trainer.max_steps=2", "--trainer.val_check_interval=2", "--data.init_args.batch_size=4",
                  "--data.init_args.eval_batch_size=8", "--data.init_args.max_eval_samples_per_domain=4",
                  "--data.init_args.domains.colour.train=colour/test.jsonl"]
QUICK_CONTINUAL = ["--data.init_args.steps_per_task=2", "--data.init_args.batch_size=4",
                   "--data.init_args.eval_batch_size=8", "--data.init_args.max_eval_samples_per_domain=4",
                   "--data.init_args.order=null",
                   "--data.init_args.tasks=[" + ", ".join(
                       f'{{"name": "{t}", "train": "{t}/test.jsonl", "test": "{t}/test.jsonl", "val": "{t}/val.jsonl"}}'
                       for t in ("count", "position_lr", "position_tb")) + "]"]


def continual_details(cli: Any) -> dict[str, Any]:
    """What a continual run measured, from its finished CLI: the accuracy matrix and its scores, adapter
    parameters, active ranks per token (and MoRA's rank usage per task)."""
    model = cli.model
    tasks = model.task_loop.task_names
    matrix = model.task_loop.accuracy.matrix()
    if matrix.shape[0] != len(tasks):
        raise RuntimeError(f"{type(model).__name__}: only {matrix.shape[0]} of {len(tasks)} rows "
                           "were evaluated")
    counts = model.adapter_parameter_counts()
    if "val/active_ranks" in cli.trainer.callback_metrics:  # MoRA: measured
        ranks = float(cli.trainer.callback_metrics["val/active_ranks"])
    else:  # plain LoRA: every rank of the one adapter in use is active for every token
        ranks = float(model.lora.r)
    usage = {task: u.tolist() for task, u in model.rank_usage.items()} if hasattr(model, "rank_usage") else None
    return {"tasks": list(tasks), "accuracy": matrix.tolist(), **continual_scores(matrix).as_dict(),
            "adapter_params_total": counts["total"],  # adapter parameters held at the end (all tasks)
            "adapter_params_per_task": counts["per_task"],  # parameters trained on one task: its adapters + the connector
            "active_ranks_per_token": ranks,  # average over real tokens and adapted layers, last evaluation
            # MoRA: evaluated task -> active ranks per token from each training task's rank block
            "rank_usage": usage}


def rank_selection_precision(usage: dict[str, list[float]] | None, tasks: list[str]) -> dict[str, float] | None:
    """Task -> share of its inputs' active ranks that are its own task's (1 = perfect selection), and `mean`
    over the tasks; from `rank_usage` (evaluated task -> active ranks per token from each task's block)."""
    if not usage:
        return None
    shares = {}
    for j, task in enumerate(tasks):
        if task in usage and sum(usage[task]) > 0:
            shares[task] = usage[task][j] / sum(usage[task])
    if not shares:
        return None
    return {**shares, "mean": sum(shares.values()) / len(shares)}


def summarise(results: list[RunResult]) -> dict[str, Any]:
    """One seed's scores per method (Last, Avg, BWT, and the diagonal: each task right after training it) and
    rank-selection precision; the verdict is over seeds (`verdicts`)."""
    scores = {r.name: {"last": r.details["last"], "avg": r.details["avg"], "bwt": r.details["bwt"],
                       "diagonal": [row[j] for j, row in enumerate(r.details["accuracy"])]} for r in results}
    precision = {r.name: rank_selection_precision(r.details.get("rank_usage"), r.details["tasks"]) for r in results}
    return {"scores": scores, "bwt": {name: s["bwt"] for name, s in scores.items()},
            "rank_selection_precision": {k: v for k, v in precision.items() if v is not None}}


def unlearnt(summaries: dict[int, dict[str, Any]], method: str, tasks: list[str], chance: dict[str, float]) -> list[str]:
    """The tasks `method` does not learn over the seeds (`learnt_over_seeds`: its accuracy right after training the
    task less than LEARNT_MARGIN above the majority answer in more than one seed of ten), each with how many seeds
    learnt it."""
    missed = []
    for j, task in enumerate(tasks):
        gains = [summaries[s]["scores"][method]["diagonal"][j] - chance[task] for s in sorted(summaries)]
        if not learnt_over_seeds(gains, LEARNT_MARGIN):
            missed.append(f"{task} ({learnt_words(gains, LEARNT_MARGIN)})")
    return missed


def verdicts(summaries: dict[int, dict[str, Any]], chance: dict[str, float], met: bool = True) -> dict[str, Any]:
    """The verdict (MoRA's BWT - sequential LoRA's, over seeds, against BWT_MARGIN) and the diagnosis (the task
    oracle's BWT - MoRA's), with their gates: no step budget qualified on val (`met` False), the upper bound
    (task-specific LoRA) or MoRA not learning a task over the seeds (`unlearnt`), sequential LoRA not
    forgetting (nothing to reduce); the diagnosis also needs the oracle to learn every task (`inconclusive:
    oracle failed`)."""
    seeds = sorted(summaries)
    first = summaries[seeds[0]]
    tasks = first["tasks"]
    methods = list(first["scores"])
    values = {m: {k: [summaries[s]["scores"][m][k] for s in seeds] for k in ("last", "avg", "bwt")} for m in methods}
    pairs = [("mora", "lora_sequential"), ("mora_task_oracle", "mora")]
    differences = {f"{a} - {b}": {k: paired_difference(values[a][k], values[b][k]) for k in ("bwt", "last", "avg")}
                   for a, b in pairs if a in values and b in values}
    if "mora - lora_sequential" not in differences:
        return {"differences": differences, "gates": [], "verdict": f"{INCONCLUSIVE}: MoRA or sequential LoRA missing",
                "diagnosis": "no diagnosis: MoRA or sequential LoRA missing"}
    failed = [] if met else [NO_DISCRIMINATING_SETTING]
    if "lora_task_specific" in methods and (missed := unlearnt(summaries, "lora_task_specific", tasks, chance)):
        failed.append(f"upper bound failed: task-specific LoRA does not learn {', '.join(missed)}")
    if missed := unlearnt(summaries, "mora", tasks, chance):
        failed.append(f"MoRA does not learn {', '.join(missed)} (what is never learnt cannot be forgotten)")
    if statistics.fmean(values["lora_sequential"]["bwt"]) > -BWT_MARGIN + TOLERANCE:
        failed.append("sequential LoRA does not forget (nothing to reduce)")
    # no ceiling / chance gate on Last: heavy forgetting brings a Last near chance, the very thing measured; an
    # arm at chance on what it should learn is caught on the diagonal above, one at ceiling does not forget
    verdict = decide(differences["mora - lora_sequential"]["bwt"], BWT_MARGIN, failed)
    if "mora_task_oracle - mora" not in differences:
        diagnosis = "no diagnosis: no task oracle"
    else:
        gate = [f"oracle failed: the task oracle does not learn {', '.join(missed)}"
                if (missed := unlearnt(summaries, "mora_task_oracle", tasks, chance)) else None]
        gate += [f for f in failed if f.startswith(("MoRA does not", "upper bound", NO_DISCRIMINATING_SETTING))]
        decided = decide(differences["mora_task_oracle - mora"]["bwt"], BWT_MARGIN, gate)
        diagnosis = {CONFIRMED: "selection failure: perfect rank selection forgets less by the margin",
                     NOT_CONFIRMED: "interference: perfect rank selection does not forget less by the margin"
                     }.get(decided, decided)
    return {"differences": differences, "gates": failed, "verdict": verdict, "diagnosis": diagnosis}


STEPS_RULE = ("the first rung at which, on val (each task's val split filling the accuracy matrix) and in every "
              "selection seed, MoRA and the upper bound (task-specific LoRA) learn every task (accuracy right after "
              f"training it at least {100 * LEARNT_MARGIN:.0f} points above the majority answer), and sequential LoRA "
              f"forgets (mean BWT over the selection seeds at most -{BWT_MARGIN}); the data is the shipped data/shapes "
              "(count -> position_lr -> position_tb)")


def selection_rejections(scores: dict[str, dict[str, Any]]) -> list[str]:
    """Why a step budget fails the rule (`STEPS_RULE`), from its val scores per selection seed ({"diagonal": method
    -> each task's accuracy right after training it, "bwt": sequential LoRA's, "chance": task -> the majority
    answer's}); none: it qualifies."""
    reasons = seed_rejections(scores)
    bwt = statistics.fmean(entry["bwt"] for entry in scores.values())
    if bwt > -BWT_MARGIN + TOLERANCE:
        reasons.append(f"sequential LoRA does not forget (mean BWT {bwt:+.3f})")
    return reasons


def seed_rejections(scores: dict[str, dict[str, Any]]) -> list[str]:
    """The part of `selection_rejections` that every selection seed must meet on its own (MoRA and the upper bound
    learn every task): one seed failing it rejects the budget, whatever the seeds not yet run would show."""
    reasons = []
    for method, label in (("lora_task_specific", "the upper bound (task-specific LoRA)"), ("mora", "MoRA")):
        missed = [f"{task} in seed {seed}" for seed, entry in scores.items()
                  for task, acc in zip(entry["chance"], entry["diagonal"][method], strict=True)
                  if acc - entry["chance"][task] < LEARNT_MARGIN - TOLERANCE]
        if missed:
            reasons.append(f"{label} does not learn {', '.join(missed)}")
    return reasons


def _selection_seed(quick: bool, steps: int, out: Path, key: dict[str, Any] | None, seed: int) -> dict[str, Any]:
    """One selection seed at one step budget, on val: the pre-training and the methods the rule reads, in
    OUT/steps<N>/seed<S>/, its scores kept there under `key` (`kept`: a selection stopped part-way and started
    again with the same command on the same commit measures only what it had not). Module-level: `map_seeds` runs
    the seeds in processes of their own."""
    directory = out / f"steps{steps}" / f"seed{seed}"

    def measured() -> dict[str, Any]:
        summary, _ = run(directory, quick, SELECTION_METHODS, seed, steps, "val")
        scores = summary["scores"]
        return {"diagonal": {m: scores[m]["diagonal"] for m in ("mora", "lora_task_specific")},
                "bwt": scores["lora_sequential"]["bwt"], "chance": summary["majority_answer"]}

    return kept(directory / "selection_scores.json", key, measured, f"selection seed {seed} at {steps} steps per task")


def select_steps(out: Path, quick: bool, seeds: list[int], jobs: int = 1, threads: int | None = None,
                 measure: Any = None, key: dict[str, Any] | None = None) -> dict[str, Any]:
    """The steps per task, chosen on val (`protocol.select_first` over the ladder, cheapest first) with the
    selection seeds, each rung's runs in OUT/steps<N>/seed<S>/; the first rung `selection_rejections` lets
    through, else the last (`met` False: every verdict is then `inconclusive: no discriminating setting`).
    `measure(rung) -> seed -> val scores` replaces the training; else the seeds run in rounds of `jobs`
    (`map_seeds_until`), each seed's scores kept under `key` (`_selection_seed`), and a round that leaves a seed
    failing what every seed must meet (`seed_rejections`) rejects the budget without the later rounds. Returns
    {"steps", "met", "tried"}."""
    def train(rung: dict[str, Any]) -> dict[str, dict[str, Any]]:
        measured = map_seeds_until(functools.partial(_selection_seed, quick, rung["steps"], out, key), seeds,
                                   lambda scores: bool(seed_rejections(scores)), jobs, threads)
        return {str(seed): scores for seed, scores in measured.items()}

    def judged(rung: dict[str, Any], scores: dict[str, dict[str, Any]]) -> list[str]:
        if missing := not_run(seeds, scores):  # stopped early: the mean BWT over the seeds is not known
            return [*seed_rejections(scores), *missing]
        return selection_rejections(scores)

    rungs = [{"setting": f"{steps} steps per task", "steps": steps}
             for steps in (QUICK_STEP_LADDER if quick else STEP_LADDER)]
    chosen = select_first(progress(rungs, "continual: choosing the steps per task on val"), measure or train, judged)
    return {"steps": chosen["chosen"]["steps"], "met": chosen["met"], "tried": chosen["tried"]}


def protocol(seeds: list[int], quick: bool = False) -> Protocol:
    selection_seeds = SELECTION_SEEDS[:1] if quick else CONTINUAL_SELECTION_SEEDS
    return Protocol(
        question="Does MoRA forget less than plain LoRA trained task after task, and is its forgetting a failure "
                 "to select each task's ranks or interference that even perfect selection keeps?",
        seeds=list(seeds), selection_split="val",
        reported_split="test (every task's test split after every task: the accuracy matrix)",
        selection="the steps per task (the same for every method), by the ladder and the rule below, on val with "
                  f"the selection seeds ({', '.join(map(str, selection_seeds))}), apart from the reported ones; "
                  "every other setting is configs/mora/continual.yaml's (docs/mora.md says how they were chosen); "
                  "every method trains its adapters and the shared connector.",
        difficulties=[f"{steps} steps per task" for steps in (QUICK_STEP_LADDER if quick else STEP_LADDER)],
        difficulty_rule=STEPS_RULE,
        primary="BWT (mean change of each earlier task's accuracy from right after training it to after the last "
                "task), reported beside Last and Avg",
        comparisons=[Comparison("mora", "lora_sequential", BWT_MARGIN, "MoRA forgets less"),
                     Comparison("mora_task_oracle", "mora", BWT_MARGIN,
                                "diagnosis: perfect rank selection forgets less (selection failure; "
                                "not confirmed: interference)")],
        gates=[NO_DISCRIMINATING_SETTING,
               "the upper bound (task-specific LoRA) or MoRA not learning a task over the seeds (its accuracy right "
               f"after training the task less than {100 * LEARNT_MARGIN:.0f} points above the majority answer in "
               "more than one seed of ten)",
               f"sequential LoRA not forgetting (mean BWT above -{BWT_MARGIN})",
               "for the diagnosis: the task oracle not learning a task (oracle failed)"],
        verdict_rule="MoRA's BWT minus sequential LoRA's over seeds against the margin (the diagnosis: the task "
                     "oracle's minus MoRA's); Last and Avg differences are reported beside it.")


def combine(summaries: dict[int, dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """Over seeds: each method's Last / Avg / BWT / forgetting and rank-selection precision (mean, range), the
    paired differences with their 95 % intervals, the gates, the verdict and the diagnosis."""
    seeds = sorted(summaries)
    runs = {s: {r["name"]: r["details"] for r in summaries[s]["runs"] if r["name"] != "pretrain"} for s in seeds}
    methods = list(runs[seeds[0]])
    tasks = runs[seeds[0]][methods[0]]["tasks"]
    scores = {m: {k: seed_stat([runs[s][m][k] for s in seeds]) for k in ("last", "avg", "bwt", "forgetting")}
              for m in methods}
    for m in methods:
        precision = [summaries[s]["rank_selection_precision"].get(m, {}).get("mean") for s in seeds]
        if all(p is not None for p in precision):
            scores[m]["rank_selection_precision"] = seed_stat(precision)
    chance = summaries[seeds[0]].get("majority_answer") or majority_answers(resolve_data_path(DATA_ROOT), tasks)
    decided = verdicts({s: {**summaries[s], "tasks": tasks} for s in seeds}, chance,
                       summaries[seeds[0]].get("discriminating") is not False)
    combined = {"scores": scores, "majority_answer": chance, **decided}
    keys = ("last", "avg", "bwt", "forgetting", "rank_selection_precision")
    lines = [f"## Over {len(seeds)} seed(s): mean (min-max)", "",
             "| method | Last | Avg | BWT (primary) | forgetting | rank-selection precision |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {m} | " + " | ".join(spread(scores[m].get(k)) for k in keys) + " |" for m in methods]
    lines += ["", "Paired differences over seeds with their 95 % intervals (BWT is the primary metric):"]
    for name, diffs in decided["differences"].items():
        lines += [f"- {difference_words(diffs['bwt'], 'BWT ' + name)} (margin {BWT_MARGIN:+.3f}).",
                  f"- {difference_words(diffs['last'], 'Last ' + name)}.",
                  f"- {difference_words(diffs['avg'], 'Avg ' + name)}."]
    lines += ["", f"Gates: {'; '.join(decided['gates']) or 'all passed'}.", "",
              f"Verdict on the paper's claim (MoRA forgets less than sequential LoRA): **{decided['verdict']}**.",
              f"Diagnosis (selection failure / interference, from the task oracle): {decided['diagnosis']}.", ""]
    return combined, "\n".join(lines)


def method_run(method: str, quick: bool, seed: int = 0, steps: int | None = None, evaluate_on: str = "test") -> Run:
    """One method over the task sequence (trained and evaluated task after task: no separate test), for `steps`
    per task (None: the config's), its matrix filled from each task's `evaluate_on` split."""
    args = ["--config", str(shipped_path(CONTINUAL)), *COMMON, *SHARED, *METHODS[method],
            f"--trainer.logger.init_args.name={method}", f"--seed_everything={seed}",
            *(QUICK_CONTINUAL if quick else []), f"--data.init_args.evaluate_on={evaluate_on}"]
    return Run(method, args + ([f"--data.init_args.steps_per_task={steps}"] if steps else []), test=False, seed=seed)


def _fmt(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.3f}"


def results_markdown(results: list[RunResult], pretrain_seconds: float, quick: bool, seed: int = 0) -> str:
    rows = [(r.name, r.details) for r in results]
    lines = [
        f"# Continual instruction tuning: MoRA vs plain LoRA{' (--quick smoke run)' if quick else ''}, seed {seed}",
        "",
        f"Task sequence: {' -> '.join(rows[0][1]['tasks'])}. Accuracy = exact match of greedy answers on each task's "
        "test split. BWT < 0 and forgetting > 0 mean forgetting.",
        "",
        "| method | Last | Avg | Transfer | BWT | forgetting | adapter params held / trained per task (adapters + connector) "
        "| active ranks per token | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (method, d), r in zip(rows, results):
        lines.append(f"| {method} | {_fmt(d['last'])} | {_fmt(d['avg'])} | {_fmt(d['transfer'])} | {_fmt(d['bwt'])} | "
                     f"{_fmt(d['forgetting'])} | {d['adapter_params_total']} / {d['adapter_params_per_task']} | "
                     f"{d['active_ranks_per_token']:.2f} | {r.wall_s:.0f} |")
    lines += ["", f"Dense pre-training of the shared base: {pretrain_seconds:.0f} s.", ""]
    for method, d in rows:
        tasks, usage = d["tasks"], d["rank_usage"]
        # the matrix as a figure: figures/<method>_accuracy.png beside this seed's results
        lines += [f"## {method}: acc[i, j]", "", accuracy_table(d["accuracy"], tasks), ""]
        if usage:
            lines += [f"{method}: active ranks per token on each task's test data, by the task that trained them "
                      "(after the last task; mean over layers)", "",
                      "| evaluated \\ ranks of | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
            lines += [f"| {t} | " + " | ".join(f"{v:.2f}" for v in usage[t]) + " |" for t in tasks if t in usage]
            lines.append("")
    return "\n".join(lines)


def run(out: str | Path, quick: bool = False, methods: list[str] | None = None, seed: int = 0,
        steps: int | None = None, evaluate_on: str = "test") -> tuple[dict[str, Any], str]:
    """One seed in `out`: the pre-training, then every method (module docstring) for `steps` per task (None: the
    config's), evaluated on each task's `evaluate_on` split. Returns the summary and its table; also draws every
    method's accuracy matrix to OUT/figures/."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    methods = methods or list(METHODS)
    pretrain = Run("pretrain", ["--config", str(shipped_path(PRETRAIN)), *COMMON, f"--seed_everything={seed}",
                                *(QUICK_PRETRAIN if quick else [])], test=False, seed=seed)
    with working_directory(out):
        results = [execute(run, out) if run.name == "pretrain" else execute(run, out, continual_details)
                   for run in progress([pretrain, *(method_run(m, quick, seed, steps, evaluate_on) for m in methods)],
                                       f"continual runs, seed {seed}")]
    pretrain_result, results = results[0], results[1:]
    for r in results:
        plots.save_png(plots.accuracy_matrix(r.details["accuracy"], r.details["tasks"]),
                       out / "figures" / f"{r.name}_accuracy.png")
    summary = {"quick": quick, "seed": seed, "pretrain_seconds": round(pretrain_result.wall_s, 1),
               "steps_per_task": steps, "evaluated_on": evaluate_on,
               "runs": [asdict(r) for r in [pretrain_result, *results]], **summarise(results),
               "majority_answer": majority_answers(resolve_data_path(DATA_ROOT), results[0].details["tasks"],
                                                   evaluate_on)}
    precision = ", ".join(f"{m} {v['mean']:.2f}" for m, v in summary["rank_selection_precision"].items()) or "-"
    return summary, "\n".join([results_markdown(results, pretrain_result.wall_s, quick, seed),
                               f"Rank-selection precision (share of active ranks from the input's own task): {precision}.",
                               ""])


def build_parser() -> argparse.ArgumentParser:
    parser = experiment_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), help="a subset of the methods (default: all)")
    return parser


def _one_seed(quick: bool, methods: list[str] | None, steps: int, met: bool, workdir: Path,
              seed: int) -> tuple[dict[str, Any], str]:
    summary, table = run(workdir, quick, methods, seed, steps)
    return {**summary, "discriminating": met}, table


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(build_parser(), argv)
    out = args.out.resolve()
    command = command_line("lightning_moe.experiments.continual", argv)
    env = environment(command)  # the commit the run starts from
    selection = select_steps(out / "selection", args.quick,
                             SELECTION_SEEDS[:1] if args.quick else CONTINUAL_SELECTION_SEEDS, args.jobs, args.threads,
                             key=resume_key(env, args.threads))
    declared = protocol(args.seeds, args.quick)
    declared.settings = {"steps_per_task": selection["steps"],
                         "met": selection["met"] or f"NO rung met the rule ({NO_DISCRIMINATING_SETTING}): the last "
                         "one is used", "ladder": selection["tried"]}
    return run_seeds(out, args.seeds, functools.partial(_one_seed, args.quick, args.methods, selection["steps"],
                                                        selection["met"]),
                     command, declared, combine, jobs=args.jobs, threads=args.threads, env=env)


if __name__ == "__main__":
    main()

"""Does a sparse model with fewer activated parameters match or beat a dense one, and hallucinate less? (MoE-LLaVA)

    python -m lightning_moe.experiments.moe_llava --out DIR [--quick] [--seeds 0 1 ...] [--jobs N] [--threads N]
        [--pope {pope_cooccur,pope}]

Through the CLI's classes (`lightning_moe.cli.main` with the shipped configs/moe_llava/ files plus a per-run
config written to OUT/configs/):

1. per seed, the seed's starting point, trained at the seed in its directory's base/ (a starting point trained
   once would hold the intervals over seeds to one draw of it, which another float order changes): stage 1
   (stage1_align.yaml: the connector), then stage 2
   (stage2_instruct.yaml: the LLM and the connector); and that instruction-tuned model widened (`widen_mlps`) to
   as many parameters as the top-2 MoE holds (`same_total_width`, computed from the models): every decoder layer's
   MLP gets new neurons whose output weights are zero, so the widened model computes exactly what it did;
2. per seed, four arms from the seed's starting point, each for `Plan.steps` steps of the same batches (the same
   samples per domain), each training its feed-forward blocks and the connector:
   - `dense`: the instruction-tuned model with its MLPs trainable (`trainable: [mlp, connector]`);
   - `moe_top1`: stage 3 (stage3_moe.yaml) with top-1 routing: every other MLP upcycled into E copies, one of
     which a token uses, so it activates as many parameters as `dense` (plus its routers'): **equal activated**;
   - `moe_top2`: stage 3 as shipped (MoE-LLaVA's top-2): a token uses two copies of each MoE layer's MLP, more
     than `dense` activates and fewer than `dense_wide`;
   - `dense_wide`: the widened model, MLPs trainable: **as many parameters in total** as `moe_top2`, all active.
   Equal activated parameters come from top-1 rather than from top-2 over experts of half the width: upcycling
   copies the dense MLP whole, so only whole copies keep the upcycled model computing what stage 2 did.

The data: the shapes set with POPE under a co-occurrence bias (`pope_cooccur`: "Is there a circle?", where in
train a circle mostly comes with a square and the test asks, half the time, about a square without a circle),
generated once into OUT/data (`data_root`: `lightning_moe.data.synthetic.generate_shapes`), the shipped
domains beside it. Every arm is tested on every domain's test split (exact match; the mean over domains is the
primary metric) and on POPE (`pope_cooccur`: accuracy, F1, yes-ratio; `--pope pope`: the shipped data and its
balanced POPE domain, without the bias). Each arm's total and activated parameters are counted
on its trained model (`models.parameter_counts`). The verdicts (`verdicts`) follow the protocol (`protocol`):
non-inferiority of the sparse arms on the primary metric (the 95 % interval of MoE - dense over seeds above
-`MARGIN`), and the hallucination comparisons on POPE. Writes OUT/results.json and OUT/results.md.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from ..data.synthetic import ShapesDifficulty, generate_shapes
from ..layers import mlp_layout
from ..metrics import pope_says_yes
from ..models import MoEConfig, MultimodalLM, decoder_layers, mlp_attribute, parameter_counts, upcycle
from ..paths import resolve_data_path, shipped_path
from . import (Run, RunResult, answers, command_line, execute, experiment_parser, majority_answers, parse_args,
               progress, run_seeds, save_pretrained_callback, validation_schedule, write_run_config)
from .protocol import Comparison, Protocol
from .statistics import (INCONCLUSIVE, at_ceiling_or_chance, curve_stat, decide, interval_words, paired_difference,
                         seed_stat, spread)

DATA_ROOT = "data/shapes"
DOMAINS = ("count", "colour", "pope", "position_lr", "position_tb")
POPE_DOMAINS = ("pope_cooccur", "pope")  # --pope: POPE with a co-occurrence bias, or the shipped balanced one
# pope_cooccur's share of train images with the asked object that also hold its companion (docs/data.md measures
# a hallucination gap at 0.9)
COOCCURRENCE = 0.9
ARMS = ("dense", "moe_top1", "moe_top2", "dense_wide")
BASE_RUNS = ("align", "instruct")
LABELS = {"dense": "dense (MLPs trained)", "moe_top1": "MoE top-1 (equal activated)",
          "moe_top2": "MoE top-2 (MoE-LLaVA)", "dense_wide": "dense, wide (equal total to MoE top-2)",
          "align": "stage 1", "instruct": "stage 2 (the seed's starting point)"}
# non-inferiority on the primary metric: 2 points of the mean accuracy over the domains (200 test samples each)
MARGIN = 0.02
POPE_MARGIN = 0.02  # hallucination: 2 points of POPE F1 / of the yes-ratio's distance to the answer key's


@dataclass
class Plan:
    align_steps: int = 300  # stage 1, as configs/moe_llava/stage1_align.yaml
    instruct_steps: int = 600  # stage 2, as stage2_instruct.yaml
    steps: int = 600  # every arm, as stage3_moe.yaml
    batch_size: int = 64
    eval_samples: int = 200  # test samples per domain
    seed: int = 0
    train_samples: int | None = None  # the first N train samples of each domain (None: all)
    curve_points: int = 4  # validations of each arm while training (its learning curve), the last at its end
    pope: str = "pope_cooccur"  # the domain POPE metrics come from: POPE_DOMAINS

    def base_signature(self) -> dict[str, Any]:
        signature = {"align_steps": self.align_steps, "instruct_steps": self.instruct_steps,
                     "batch_size": self.batch_size, "eval_samples": self.eval_samples, "seed": self.seed,
                     "pope": self.pope}
        return signature | ({"train_samples": self.train_samples} if self.train_samples else {})


QUICK = Plan(align_steps=2, instruct_steps=2, steps=2, batch_size=4, eval_samples=4, train_samples=32, curve_points=2)

# the metrics compared: key -> words (the protocol's); "mean" is the primary metric
METRICS = {"mean": "the primary metric",
           "pope_f1": "POPE F1 (test)",
           "pope_yes_error": "POPE yes-ratio error, |yes-ratio - the answer key's yes share| (test; lower is better)"}
# name -> (metric key, the comparison): a POPE yes-ratio error compares dense - MoE (the MoE's the smaller)
COMPARISONS = {
    "equal_activated": ("mean", Comparison(
        "moe_top1", "dense", -MARGIN, "non-inferiority: at equal activated parameters the sparse model matches or "
        "beats the dense one")),
    "equal_total": ("mean", Comparison(
        "moe_top2", "dense_wide", -MARGIN, "non-inferiority: with fewer activated parameters and as many in total, "
        "the sparse model matches or beats the dense one")),
    "pope_f1": ("pope_f1", Comparison(
        "moe_top1", "dense", POPE_MARGIN, "at equal activated parameters the sparse model hallucinates less: a higher "
        "POPE F1", METRICS["pope_f1"])),
    "pope_yes_error": ("pope_yes_error", Comparison(
        "dense", "moe_top1", POPE_MARGIN, "at equal activated parameters the sparse model hallucinates less: its "
        "yes-ratio nearer the answer key's", METRICS["pope_yes_error"])),
}
# the claims and the comparisons each rests on (its verdict: theirs when they agree, else inconclusive)
CLAIMS = {"matches or beats the dense model with fewer or equal activated parameters": ("equal_activated",
                                                                                        "equal_total"),
          "hallucinates less on POPE": ("pope_f1", "pope_yes_error")}


def protocol(seeds: list[int], plan: Plan) -> Protocol:
    return Protocol(
        question="Does a sparse model (MoE-tuning: upcycled experts) with fewer or equal activated parameters match "
                 "or beat a dense model trained from the same starting point for the same steps, and hallucinate "
                 "less on POPE?",
        seeds=list(seeds), selection_split="none", reported_split="test",
        selection="none in this experiment: every setting is configs/moe_llava/*.yaml's; stages 1 and 2 are trained "
                  f"per seed, at the seed, and that seed's arms start from their output (dense_wide from it widened "
                  f"without changing what it computes) and trains for {plan.steps} steps of the same batches. POPE "
                  f"from the `{plan.pope}` domain.",
        primary="mean test exact match over the domains",
        comparisons=[comparison for _, comparison in COMPARISONS.values()],
        gates=["an arm of the comparison at ceiling or chance on the primary metric (on POPE accuracy for the POPE "
               "comparisons)"],
        verdict_rule="each comparison on its own (a negative margin: non-inferiority, confirmed when the interval's "
                     "lower end lies above it); each claim is its comparisons' verdict when they agree, else "
                     "inconclusive: " + "; ".join(f"\"{claim}\": {', '.join(names)}" for claim, names in CLAIMS.items())
                     + ".")


# ---------------------------------------------------------------------------- the dense model of the MoE's total
def _grown(linear: nn.Linear, rows: int = 0, columns: int = 0, std: float = 0.0,
           generator: torch.Generator | None = None) -> nn.Linear:
    """`linear` with `rows` more outputs (weights drawn from N(0, std), bias 0) and `columns` more inputs
    (weights 0)."""
    grown = nn.Linear(linear.in_features + columns, linear.out_features + rows, bias=linear.bias is not None,
                      dtype=linear.weight.dtype, device=linear.weight.device)
    with torch.no_grad():
        grown.weight.zero_()
        grown.weight[: linear.out_features, : linear.in_features] = linear.weight
        if rows:
            drawn = torch.randn(rows, linear.in_features, generator=generator, dtype=torch.float32) * std
            grown.weight[linear.out_features:, : linear.in_features] = drawn.to(grown.weight)
        if linear.bias is not None:
            grown.bias.zero_()
            grown.bias[: linear.out_features] = linear.bias
    return grown


def widen_mlps(model: MultimodalLM, width: int, seed: int = 0) -> None:
    """Every decoder layer's MLP to `width` neurons, in place, computing exactly what it did: each new neuron's
    input weights are drawn as the LLM initialises (N(0, initializer_range), generator seeded with `seed`), its
    output weights are zero, so it trains from the first step. The LLM's config records the width, so
    `save_pretrained` writes a model that loads as any other."""
    config = model.llm.config
    old = config.intermediate_size
    if width < old:
        raise ValueError(f"widen_mlps: width {width} is below the MLPs' {old}")
    generator = torch.Generator().manual_seed(seed)
    std = getattr(config, "initializer_range", 0.02)
    for layer in decoder_layers(model.llm):
        mlp = getattr(layer, mlp_attribute(layer))
        names = mlp_layout(mlp).names  # the input projections (gate, up: their outputs are the neurons), then down
        for role, name in names.items():
            if role != "down":
                setattr(mlp, name, _grown(getattr(mlp, name), rows=width - old, std=std, generator=generator))
        setattr(mlp, names["down"], _grown(getattr(mlp, names["down"]), columns=width - old))
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = width
    config.intermediate_size = width


def same_total_width(dense: MultimodalLM, total: int) -> int:
    """The MLP width at which `dense`, widened by `widen_mlps`, holds the number of parameters nearest `total`
    (every width adds the same number of parameters per neuron, measured by widening a copy by one)."""
    base = parameter_counts(dense).total
    width = dense.llm.config.intermediate_size
    wider = copy.deepcopy(dense)
    widen_mlps(wider, width + 1)
    per_neuron = parameter_counts(wider).total - base
    return width + max(0, round((total - base) / per_neuron))


def moe_config(top_k: int) -> dict[str, Any]:
    """configs/moe_llava/stage3_moe.yaml's `moe` with `top_k`."""
    shipped = yaml.safe_load(shipped_path("configs/moe_llava/stage3_moe.yaml").read_text())
    return {**shipped["model"]["init_args"]["moe"], "top_k": top_k}


def write_wide_model(instruct: Path, target: Path, seed: int) -> dict[str, int]:
    """The stage-2 model of `instruct` widened to the top-2 MoE's total parameters, into `target` (its tokenizer
    files copied along); returns the widths and the totals behind them."""
    model = MultimodalLM.from_pretrained(instruct)
    moe = upcycle_copy(model, moe_config(2))
    width = same_total_width(model, parameter_counts(moe).total)
    original = model.llm.config.intermediate_size
    widen_mlps(model, width, seed)
    shutil.copytree(instruct, target, dirs_exist_ok=True)
    model.save_pretrained(target)
    return {"width": original, "wide_width": width, "moe_top2_total": parameter_counts(moe).total,
            "wide_total": parameter_counts(model).total}


def upcycle_copy(model: MultimodalLM, moe: dict[str, Any]) -> MultimodalLM:
    """A copy of `model` upcycled as stage 3 upcycles it."""
    sparse = copy.deepcopy(model)
    upcycle(sparse, MoEConfig(**moe))
    return sparse


# ---------------------------------------------------------------------------- the data
def data_root(plan: Plan, out: Path) -> Path:
    """The data every run reads: (`plan.pope` pope_cooccur) the shapes set with the co-occurrence domain,
    generated once into OUT/data (at the plan's sizes; reused by a later run into the same OUT), or the shipped
    shapes set."""
    if plan.pope == "pope":
        return resolve_data_path(DATA_ROOT)
    if plan.pope != "pope_cooccur":
        raise ValueError(f"Plan.pope must be one of {POPE_DOMAINS}, got {plan.pope!r}")
    return generate_shapes(out / "data", ShapesDifficulty(cooccurrence=COOCCURRENCE), seed=0,
                           n_train=plan.train_samples or 2000, n_eval=plan.eval_samples)


def domains(plan: Plan) -> tuple[str, ...]:
    return DOMAINS + ((plan.pope,) if plan.pope != "pope" else ())


# ---------------------------------------------------------------------------- the runs
def _config(plan: Plan, out: Path, root: Path, name: str, steps: int, model: dict[str, Any], seed: int,
            save: Path | None = None, curve: bool = False) -> Path:
    """The per-run overrides on top of a shipped config (`write_run_config`); `save`: the model's output directory;
    `curve`: validate on val `plan.curve_points` times while training."""
    return write_run_config(
        out, name, seed, steps, validation_schedule(steps, plan.curve_points if curve else 0),
        {**model, "pope_domains": sorted({"pope", plan.pope})},
        {"init_args": {"root": str(root), "batch_size": plan.batch_size, "eval_batch_size": 200, "seed": seed,
                       "max_eval_samples_per_domain": plan.eval_samples, "defer_train_decoding": True,
                       "max_train_samples_per_domain": plan.train_samples}},
        [] if save is None else [save_pretrained_callback(save)])


def _run(shipped: str, config: Path, name: str, out: Path, seed: int) -> RunResult:
    run = Run(name, ["--config", str(shipped_path(f"configs/moe_llava/{shipped}")), "--config", str(config)],
              label=LABELS.get(name, name), seed=seed)
    return execute(run, out)


def train_base(plan: Plan, base: Path, root: Path) -> tuple[dict[str, RunResult], dict[str, int]]:
    """Stages 1 and 2 and the widened stage-2 model, made in `base` with `plan.seed` and reused when
    `base` already holds them for this plan's settings. Returns the two runs and the widths (`write_wide_model`)."""
    saved, signature = base / "results.json", plan.base_signature()
    if saved.is_file():
        stored = json.loads(saved.read_text())
        if stored.get("plan") == signature:
            return {n: RunResult.from_dict(r) for n, r in stored["runs"].items()}, stored["widths"]
    models = base / "models"
    results = {
        "align": _run("stage1_align.yaml", _config(plan, base, root, "align", plan.align_steps, {}, plan.seed,
                                                   save=models / "align"), "align", base, plan.seed)}
    config = _config(plan, base, root, "instruct", plan.instruct_steps,
                     {"backbone": {"pretrained": str(models / "align")}}, plan.seed, save=models / "instruct")
    results["instruct"] = _run("stage2_instruct.yaml", config, "instruct", base, plan.seed)
    widths = write_wide_model(models / "instruct", models / "instruct_wide", plan.seed)
    saved.write_text(json.dumps({"plan": signature, "runs": {n: asdict(r) for n, r in results.items()},
                                 "widths": widths}, indent=2))
    return results, widths


def arms(base: Path) -> dict[str, tuple[str, dict[str, Any]]]:
    """arm -> (the shipped config it starts from, its model overrides): every arm from the seed's starting point,
    training its feed-forward blocks and the connector (the vision tower frozen, as in stage 3)."""
    instruct, wide = str(base / "models" / "instruct"), str(base / "models" / "instruct_wide")
    dense = {"trainable": ["mlp", "connector"], "train_vision_tower": False}
    return {"dense": ("stage2_instruct.yaml", {"backbone": {"pretrained": instruct}, **dense}),
            "moe_top1": ("stage3_moe.yaml", {"backbone": {"pretrained": instruct}, "moe": moe_config(1)}),
            "moe_top2": ("stage3_moe.yaml", {"backbone": {"pretrained": instruct}, "moe": moe_config(2)}),
            "dense_wide": ("stage2_instruct.yaml", {"backbone": {"pretrained": wide}, **dense})}


def run(out: Path, plan: Plan, root: Path) -> tuple[dict[str, Any], str]:
    """One seed (`plan.seed`) in `out`: its starting point in OUT/base (`train_base`), then the four arms from it."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    base = out / "base"
    results, widths = train_base(plan, base, root)
    bar = progress(len(ARMS), f"moe_llava arms, seed {plan.seed}")
    for arm, (shipped, model) in arms(base).items():
        config = _config(plan, out, root, arm, plan.steps, model, plan.seed, curve=True)
        results[arm] = _run(shipped, config, arm, out, plan.seed)
        bar.update()
    bar.close()
    summary = summarise(plan, results, root, widths)
    summary["seconds"] = time.perf_counter() - start
    return summary, seed_table(summary)


# ---------------------------------------------------------------------------- one seed's numbers
def pope_metrics(result: RunResult, domain: str, yes_share: float) -> dict[str, float]:
    """POPE accuracy, F1, yes-ratio and the yes-ratio's distance to the answer key's yes share, on the test split."""
    m = result.metrics
    values = {k: m[f"test/{domain}/pope_{k}"] for k in ("accuracy", "f1", "yes_ratio")
              if f"test/{domain}/pope_{k}" in m}
    if "yes_ratio" in values:
        values["yes_error"] = abs(values["yes_ratio"] - yes_share)
    return values


def summarise(plan: Plan, results: dict[str, RunResult], root: Path, widths: dict[str, int]) -> dict[str, Any]:
    evaluated = domains(plan)
    accuracy = {name: {d: r.metrics[f"test/{d}/exact_match"] for d in evaluated if f"test/{d}/exact_match" in r.metrics}
                for name, r in results.items()}
    key = answers(root, plan.pope, "test", plan.eval_samples)
    yes_share = sum(pope_says_yes(a) for a in key) / len(key)
    chance = majority_answers(root, evaluated, "test", plan.eval_samples)
    return {"plan": asdict(plan), "runs": {n: asdict(r) for n, r in results.items()}, "accuracy": accuracy,
            "mean": {n: sum(a.values()) / len(a) for n, a in accuracy.items()},
            "pope": {n: pope_metrics(r, plan.pope, yes_share) for n, r in results.items()},
            "parameters": {n: {"total": r.params_total, "activated": r.params_activated,
                               "trainable": r.params_trainable} for n, r in results.items()},
            "widths": widths, "yes_share": yes_share,
            # the gates' chance levels: always giving the most frequent answer (mean over domains; POPE's own)
            "chance": {"mean": sum(chance.values()) / len(chance), "pope": chance[plan.pope]}}


def _millions(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.3f}M"


def seed_table(summary: dict[str, Any]) -> str:
    """One seed's parameters, per-domain accuracy, mean and POPE metrics (%)."""
    evaluated = domains(Plan(**summary["plan"]))
    lines = ["| run | total | activated | " + " | ".join(evaluated) + " | mean | POPE acc | POPE F1 | yes-ratio |",
             "|---" * (len(evaluated) + 7) + "|"]
    for row in (*ARMS, *BASE_RUNS):
        params, pope = summary["parameters"][row], summary["pope"][row]
        accuracy = summary["accuracy"][row]
        cells = [f"{100 * accuracy[d]:.1f}" if d in accuracy else "-" for d in evaluated]
        cells += [f"{100 * summary['mean'][row]:.1f}",
                  *(f"{100 * pope[k]:.1f}" if k in pope else "-" for k in ("accuracy", "f1", "yes_ratio"))]
        lines.append(f"| {LABELS[row]} | {_millions(params['total'])} | {_millions(params['activated'])} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the verdicts
def verdicts(values: dict[str, dict[str, list[float]]], chance: dict[str, float]) -> dict[str, Any]:
    """The protocol's rule on per-seed values (`values[metric][arm]`: "mean", "pope_f1", "pope_yes_error",
    "pope_accuracy"; `chance`: "mean" and "pope"): per comparison (`COMPARISONS`), a - b over seeds (paired, 95 %
    interval) against its margin (`statistics.decide`), inconclusive when one of its arms sits at ceiling or chance
    (on the primary metric; on POPE accuracy for a POPE comparison); per claim (`CLAIMS`), its comparisons'
    verdict when they agree, else inconclusive."""
    differences, per_comparison, gates = {}, {}, []
    for name, (metric, c) in COMPARISONS.items():
        gate_metric, gate_chance, where = (("mean", chance["mean"], "") if metric == "mean"
                                           else ("pope_accuracy", chance["pope"], " on POPE"))
        failed = [at_ceiling_or_chance(LABELS[arm] + where, values[gate_metric][arm], gate_chance)
                  for arm in (c.a, c.b)]
        gates += [g for g in failed if g and g not in gates]
        differences[name] = paired_difference(values[metric][c.a], values[metric][c.b])
        per_comparison[name] = decide(differences[name], c.margin, failed)
    claims = {}
    for claim, names in CLAIMS.items():
        found = [per_comparison[n] for n in names]
        if len(set(found)) == 1:
            claims[claim] = found[0]
            continue
        why = "not every comparison is decided" if any(v.startswith(INCONCLUSIVE) for v in found) else \
            "the comparisons disagree"
        claims[claim] = f"{INCONCLUSIVE}: {why} (" + "; ".join(f"{n}: {v}" for n, v in zip(names, found)) + ")"
    return {"differences": differences, "verdicts": per_comparison, "claims": claims, "gates": gates}


def per_seed_values(summaries: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """metric -> arm -> the value of every seed, as `verdicts` reads them."""
    values = {"mean": {arm: [s["mean"][arm] for s in summaries] for arm in ARMS}}
    for metric in ("f1", "yes_error", "accuracy"):
        values[f"pope_{metric}"] = {arm: [s["pope"][arm].get(metric, float("nan")) for s in summaries] for arm in ARMS}
    return values


def combine(per_seed: dict[int, dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """Mean and range over seeds of every arm's parameters, accuracies and POPE metrics; the paired differences, the
    verdicts per comparison and per claim."""
    summaries = [per_seed[s] for s in sorted(per_seed)]
    plan = Plan(**summaries[0]["plan"])
    evaluated = domains(plan)
    rows = [*ARMS, *BASE_RUNS]
    per = {row: {d: seed_stat([s["accuracy"][row][d] for s in summaries]) for d in summaries[0]["accuracy"][row]}
           for row in rows}
    means = {row: seed_stat([s["mean"][row] for s in summaries]) for row in rows}
    pope = {row: {k: seed_stat([s["pope"][row][k] for s in summaries]) for k in summaries[0]["pope"][row]}
            for row in rows}
    decided = verdicts(per_seed_values(summaries), summaries[0]["chance"])
    curves = {arm: curve_stat([s["runs"][arm]["details"].get("val_curves", {}).get("val/exact_match", [])
                               for s in summaries], plan.batch_size) for arm in ARMS}
    # keys apart from a seed summary's (one seed's results.json holds both)
    result = {"per_domain": per, "mean_over_seeds": means, "pope_over_seeds": pope,
              "learning_curves": {arm: c for arm, c in curves.items() if c}, **decided,
              "margins": {name: c.margin for name, (_, c) in COMPARISONS.items()}}
    parameters = summaries[0]["parameters"]  # the same in every seed: the arms' shapes do not depend on it
    lines = ["| run | total | activated | trainable | " + " | ".join(evaluated)
             + " | mean | POPE acc | POPE F1 | yes-ratio |", "|---" * (len(evaluated) + 8) + "|"]
    for row in rows:
        p = parameters[row]
        cells = [spread(per[row].get(d), 100, 1) or "-" for d in evaluated]
        cells += [spread(means[row], 100, 1), *(spread(pope[row].get(k), 100, 1) or "-"
                                                 for k in ("accuracy", "f1", "yes_ratio"))]
        lines.append(f"| {LABELS[row]} | {_millions(p['total'])} | {_millions(p['activated'])} | "
                     f"{_millions(p['trainable'])} | " + " | ".join(cells) + " |")
    widths = summaries[0]["widths"]
    comparisons = []
    for name, (metric, c) in COMPARISONS.items():
        what = "mean accuracy" if metric == "mean" else METRICS[metric].split(" (")[0]
        interval = interval_words(decided["differences"][name], 100, " points")
        comparisons.append(f"- {c.claim}? {c.a} minus {c.b} ({what}) {interval}; margin {100 * c.margin:+.1f} points: "
                           f"**{decided['verdicts'][name]}**.")
    text = "\n".join([
        "## MoE-LLaVA: sparse against dense at equal activated and equal total parameters", "",
        f"Test exact match (%) per domain ({plan.eval_samples} samples each) and POPE (`{plan.pope}`; the answer key "
        f"says yes to {100 * summaries[0]['yes_share']:.0f}%), mean (min-max) over {len(summaries)} seed(s); stage 1: "
        f"{plan.align_steps} steps, stage 2: {plan.instruct_steps} steps (per seed); each arm: "
        f"{plan.steps} steps of batch {plan.batch_size} from stage 2's model. Parameters counted on each trained model "
        f"(activated: a top-k of E experts counts k/E); the wide dense model's MLPs have {widths['wide_width']} "
        f"neurons (stage 2's: {widths['width']}), the width whose total is nearest the top-2 MoE's.", "",
        *lines, "",
        *comparisons,
        f"- Gates: {'; '.join(decided['gates']) or 'all passed'}.", "",
        *[f"Verdict on \"{claim}\": **{verdict}** (the protocol's rule)."
          for claim, verdict in decided["claims"].items()],
        "",
    ])
    return result, text


def build_parser() -> argparse.ArgumentParser:
    parser = experiment_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--pope", choices=POPE_DOMAINS, default="pope_cooccur",
                        help="the POPE domain: `pope_cooccur` (a co-occurrence bias; the data generated into "
                        "OUT/data), or the shipped data's balanced `pope`")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(build_parser(), argv)
    plan = replace(QUICK if args.quick else Plan(), pope=args.pope)
    out = args.out.resolve()
    root = data_root(plan, out)
    command = command_line("lightning_moe.experiments.moe_llava", argv)
    return run_seeds(out, args.seeds, functools.partial(_one_seed, plan, root), command,
                     protocol(args.seeds, plan), combine, jobs=args.jobs, threads=args.threads)


def _one_seed(plan: Plan, root: Path, workdir: Path, seed: int) -> tuple[dict[str, Any], str]:
    return run(workdir, replace(plan, seed=seed), root)


if __name__ == "__main__":
    main()

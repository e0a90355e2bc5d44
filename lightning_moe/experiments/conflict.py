"""Does a mixture of LoRA experts mitigate data conflicts? (LLaVA-MoLE's question)

    python -m lightning_moe.experiments.conflict --out runs/conflict [--quick] [--seeds 0 1 ...] [--threads N]
        [--reuse EARLIER_OUT] [--steps N] [--rank R]

From one dense base model (configs/mole/base.yaml: trained on the white-image domains, saved
once under OUT/base and reused by every run and seed; `--reuse` takes it from an earlier output
directory trained with the same base plan), first chooses the rank and steps on val (`select_setting`:
the first of `Plan.candidates` at which plain LoRA alone learns each domain of the conflicting pair in
every seed; runs in OUT/selection/; skipped when `--rank`/`--steps` are given), then trains at equal
steps and seeds, through the CLI's classes (`lightning_moe.cli.main` with the shipped configs plus a
per-run config written to OUT/configs/):

- plain LoRA on each domain alone (configs/mole/lora.yaml, one run per domain; together, the
  per-domain-LoRA upper bound),
- plain LoRA on the mixture of all the experiment's domains,
- plain LoRA with 4x the rank on the mixture,
- MoLE on the mixture (configs/mole/mole.yaml, same LoRA rank as plain LoRA),
- the oracle-routed MoLE (one expert per domain, each sample's tokens sent to its domain's expert),

then tests every run on every domain's test split (exact match) and writes OUT/results.json,
OUT/results.md (rows = runs; per-domain accuracy, mean, trainable parameters, median train step
time), each run's console output under OUT/logs/ and TensorBoard logs under OUT/tensorboard/<run>
(MoLE's domain x expert heat maps included). Several seeds: each seed's runs in OUT/seed<N>/, and
the tables, verdict and diagnosis over the seeds in OUT/results.* (`combine`). Each MoLE run records
which expert each test domain's answer tokens get and the router entropy over training; the diagnosis
(`diagnosis`) says whether the learnt router or the experts' capacity fails, from the oracle.

The conflict: `position_lr` and `position_tb` ask the same question ("Where is the red shape?")
answered left/right on grey images and top/bottom on dark ones. A domain *loses to the mixture*
(`conflicted_domains`) when plain LoRA on that domain alone beats the majority-answer score of the
domain's test samples (always giving the most frequent answer) by at least `CONFLICT_MARGIN`, and
plain LoRA on the mixture is at least `CONFLICT_MARGIN` below it: a domain not learnt even alone,
where the alone run gives one constant answer, shows no conflict whatever the mixture run answers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.fabric.utilities.apply_func import move_data_to_device
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ..data.records import parse_record, read_llava_records
from ..metrics import majority_answer_score
from ..models import routed_layers
from ..paths import resolve_data_path, shipped_path
from . import (Run, RunResult, command_line, execute, experiment_parser, parse_args, progress, run_seeds)
from .protocol import (Protocol, agreement, agreement_words, difference_words, paired_difference, seed_stat,
                       spread)

# A drop of 5 points on 200 test samples is about two standard errors of an accuracy near 80%.
CONFLICT_MARGIN = 0.05
# accuracies are counts / samples: a difference of exactly the margin must count despite float rounding
TOLERANCE = 1e-9
DATA_ROOT = "data/shapes"  # the shipped configs' data root
# what the base trains on (configs/mole/base.yaml): the white-image domains, none of the position pair
BASE_DOMAINS = ("count", "colour", "pope")


@dataclass
class Plan:
    """Everything the experiment's numbers depend on (the base is reused only under the same base plan)."""

    # the conflicting pair + one domain the base already knows (does adapting break it?)
    domains: list[str] = field(default_factory=lambda: ["count", "position_lr", "position_tb"])
    base_steps: int = 400  # dense pre-training of the base model (configs/mole/base.yaml)
    steps: int = 300  # training steps of every adapter run
    rank: int = 1  # plain LoRA and MoLE (per expert) rank; the big LoRA gets 4x. At rank 2, 300 steps
    #                 were enough for plain LoRA to learn both conventions from the mixture (no conflict)
    experts: list[int] = field(default_factory=lambda: [2, 3])  # one MoLE run per expert count (reference: 3)
    lr: float = 2e-3
    batch_size: int = 64
    eval_samples: int = 200  # test samples per domain (the whole shipped test split)
    seed: int = 0  # of every adapter run (initialisation, sampling order, dropout)
    base_seed: int = 0  # of the base model's training
    # the conflicting pair: the selection requires plain LoRA alone to learn each of them on val
    pair: list[str] = field(default_factory=lambda: ["position_lr", "position_tb"])
    # (rank, steps) tried on val in this order (cheapest first) by `select_setting`; the first at which plain
    # LoRA alone learns every domain of the pair in every seed is used for every run
    candidates: list[list[int]] = field(default_factory=lambda: [[1, 300], [2, 300], [1, 600], [2, 600], [4, 600]])
    val_samples: int = 200  # val samples per domain the selection scores (the whole shipped val split)
    oracle: bool = True  # the oracle-routed MoLE (one expert per domain, routed by the domain id)
    train_samples: int | None = None  # the first N train samples of each domain (None: all)

    def base_signature(self) -> dict[str, Any]:
        signature = {"base_steps": self.base_steps, "batch_size": self.batch_size, "seed": self.base_seed}
        return signature | ({"train_samples": self.train_samples} if self.train_samples else {})


# the smoke test: only the conflicting pair, a few steps on a few samples
QUICK = Plan(domains=["position_lr", "position_tb"], base_steps=3, steps=3, experts=[3], batch_size=8, eval_samples=8,
             candidates=[[1, 3]], val_samples=8, train_samples=64)


def accuracy(result: RunResult, domains: list[str]) -> dict[str, float]:
    """Domain -> test exact match of one run."""
    return {d: result.metrics[f"test/{d}/exact_match"] for d in domains}


def _data_config(plan: Plan, train_domains: list[str], seed: int, split: str = "test",
                 evaluated: list[str] | None = None) -> dict[str, Any]:
    """Train on `train_domains`, evaluate (`trainer.test`) every domain of `evaluated` (default the plan's) on
    `split`: test for the reported runs, val for the selection (no validation during training)."""
    evaluated = plan.domains if evaluated is None else evaluated
    domains = {d: {"train": f"{d}/train.jsonl" if d in train_domains else None,
                   "test": f"{d}/{split}.jsonl" if d in evaluated else None}
               for d in [*evaluated, *(d for d in train_domains if d not in evaluated)]}
    samples = plan.val_samples if split == "val" else plan.eval_samples
    return {"class_path": "lightning_moe.data.DomainMixtureDataModule",
            "init_args": {"domains": domains, "batch_size": plan.batch_size, "eval_batch_size": 200,
                          "max_eval_samples_per_domain": samples, "max_train_samples_per_domain": plan.train_samples,
                          "seed": seed}}


def _run_config(plan: Plan, out: Path, name: str, train_domains: list[str], steps: int,
                callbacks: list[dict[str, Any]], model: dict[str, Any], seed: int, split: str = "test",
                evaluated: list[str] | None = None) -> Path:
    """The per-run overrides on top of a shipped config, written where a reader can rerun them."""
    config = {
        "seed_everything": seed,
        "trainer": {
            "max_steps": steps, "limit_val_batches": 0, "num_sanity_val_steps": 0, "enable_checkpointing": False,
            "enable_progress_bar": False, "enable_model_summary": False, "log_every_n_steps": max(1, min(20, steps)),
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(out / "tensorboard"), "name": name, "version": ""}},
            "callbacks": [{"class_path": "lightning_moe.callbacks.StageProfile", "init_args": {"warmup_steps": 5}}, *callbacks],
        },
        "model": {"init_args": model},
        "data": _data_config(plan, train_domains, seed, split, evaluated),
    }
    path = out / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _fit_and_test(shipped: str, run_config: Path, name: str, label: str, train_domains: list[str],
                  out: Path, seed: int | None, inspect: Any = None) -> RunResult:
    """The shipped config plus the run's own, trained and tested (`experiments.execute`), as a table row."""
    run = Run(name, ["--config", str(shipped_path(f"configs/mole/{shipped}")), "--config", str(run_config)],
              label=label, seed=seed)
    result = execute(run, out, inspect)
    result.details["train_domains"] = train_domains
    return result


def _saved_base(base: Path, plan: Plan) -> tuple[Path, RunResult | None] | None:
    """The base model saved under `base` if it was trained with this plan's base signature, with its test row
    when that row covers the plan's domains; else None."""
    model_dir, signature_file = base / "model", base / "plan.json"
    if not ((model_dir / "multimodal_config.json").is_file() and signature_file.is_file()):
        return None
    if json.loads(signature_file.read_text()) != plan.base_signature():
        return None
    saved = base / "result.json"
    result = RunResult.from_dict(json.loads(saved.read_text())) if saved.is_file() else None
    covered = result is not None and all(f"test/{d}/exact_match" in result.metrics for d in plan.domains)
    return model_dir, result if covered else None


def train_base(plan: Plan, base: Path, out: Path, reuse: Path | None = None) -> tuple[Path, RunResult | None]:
    """The dense base model: trained once per base plan, reused when `base` (or `reuse`, the base directory of
    an earlier output) already holds it."""
    for candidate in (base, reuse):
        if candidate is not None and (saved := _saved_base(candidate, plan)) is not None:
            return saved
    model_dir, signature_file = base / "model", base / "plan.json"
    callbacks = [{"class_path": "lightning_moe.callbacks.SavePretrained", "init_args": {"dirpath": str(model_dir)}}]
    # the base trains on the white-image domains only (configs/mole/base.yaml); it is tested on the plan's
    run_config = _run_config(plan, out, "base", list(BASE_DOMAINS), plan.base_steps, callbacks, {}, plan.base_seed)
    result = _fit_and_test("base.yaml", run_config, "base", "base model (no adapters)", list(BASE_DOMAINS), out, None)
    signature_file.write_text(json.dumps(plan.base_signature()))
    (base / "result.json").write_text(json.dumps(asdict(result)))
    return model_dir, result


def adapter_runs(plan: Plan) -> list[tuple[str, str, str, list[str], dict[str, Any]]]:
    """(name, label, shipped config, training domains, model overrides) of every adapter run."""
    lora = {"lora": {"r": plan.rank, "alpha": 2.0 * plan.rank}}
    big = {"lora": {"r": 4 * plan.rank, "alpha": 8.0 * plan.rank}}
    runs = [(f"lora_{d}", f"LoRA r={plan.rank}, {d} alone", "lora.yaml", [d], lora) for d in plan.domains]
    runs += [("lora_mixture", f"LoRA r={plan.rank}, mixture", "lora.yaml", plan.domains, lora),
             ("lora4x_mixture", f"LoRA r={4 * plan.rank}, mixture", "lora.yaml", plan.domains, big)]
    runs += [(f"mole{e}_mixture", f"MoLE {e} experts r={plan.rank}, mixture", "mole.yaml", plan.domains,
              {**lora, "experts": {"num_experts": e}}) for e in plan.experts]
    if plan.oracle:  # one expert per domain, routed by the domain id; no balance loss (the routing is fixed)
        e = len(plan.domains)
        runs.append(("oracle_mixture", f"MoLE oracle-routed, {e} experts r={plan.rank} (one per domain), mixture",
                     "mole.yaml", plan.domains, {**lora, "experts": {"num_experts": e, "oracle_domains": plan.domains},
                                                 "aux_loss": {"coef": 0.0}}))
    return runs


@torch.no_grad()
def answer_routing(cli: Any) -> dict[str, Any]:
    """A MoLE run's routing of the answer tokens (label != -100) of each test domain, from its finished CLI:
    layer -> domain -> share of the domain's answer tokens per expert; and the router entropy logged over
    training (TensorBoard, `RoutingStatistics`): layer -> [(step, entropy)]."""
    method, data = cli.model, cli.datamodule
    method.eval()
    layers = [(name, layer) for name, layer in routed_layers(method.model)]
    counts: dict[str, dict[str, torch.Tensor]] = {name: {} for name, _ in layers}
    for loader in data.test_dataloader():
        for batch in loader:
            batch = move_data_to_device(batch, method.device)
            if hasattr(method, "route_batch"):  # the oracle's routing, as in its own forward passes
                method.route_batch(batch)
            out = method.model(**method.model_inputs(batch), labels=batch["labels"])
            answer = out.labels != -100  # (B, T') the answer tokens, as the router sees them
            for name, layer in layers:
                experts = layer.last_routing.indices[:, 0]  # (B * T',) top-1
                for domain in sorted(set(batch["domain"])):
                    of_domain = torch.tensor([d == domain for d in batch["domain"]], device=answer.device)
                    mask = (answer & of_domain[:, None]).reshape(-1)  # (B * T',)
                    tally = torch.bincount(experts[mask], minlength=layer.last_routing.num_experts).cpu()
                    counts[name][domain] = counts[name].get(domain, 0) + tally
    shares = {name: {d: (c / c.sum().clamp(min=1)).tolist() for d, c in per_domain.items()}
              for name, per_domain in counts.items()}
    return {"answer_routing": shares, "routing_entropy": logged_entropy(cli)}


def logged_entropy(cli: Any) -> dict[str, list[list[float]]]:
    """layer -> [(step, router entropy in nats)] as `RoutingStatistics` logged it during training."""
    logger = cli.trainer.logger
    if logger is None or not getattr(logger, "log_dir", None):
        return {}
    logger.experiment.flush()
    events = EventAccumulator(str(logger.log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag.removeprefix("routing/").removesuffix("/entropy"): [[e.step, e.value] for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"] if tag.startswith("routing/") and tag.endswith("/entropy")}


def _adapter_overrides(plan: Plan, model: dict[str, Any], base_model: Path) -> dict[str, Any]:
    """An adapter run's model overrides: its adapters, the shared base, the plan's optimizer."""
    return {**model, "backbone": {"pretrained": str(base_model)},
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": plan.lr, "weight_decay": 0.0}}}


def learns_everywhere(scores: dict[int, dict[str, float]], majority: dict[str, float], pair: list[str],
                      margin: float = CONFLICT_MARGIN) -> bool:
    """The selection rule: in every seed (seed -> domain -> val accuracy of plain LoRA alone), every domain
    of `pair` is learnt (`learnt_domains`: at least `margin` above its majority answer)."""
    return bool(scores) and all(set(pair) <= set(learnt_domains({d: acc[d] for d in pair}, majority, margin))
                                for acc in scores.values())


def select_setting(plan: Plan, seeds: list[int], base_model: Path, out: Path,
                   measure: Callable[[int, int], dict[int, dict[str, float]]] | None = None) -> dict[str, Any]:
    """The pre-registered choice of (rank, steps), on val: the candidates in order; at each, plain LoRA alone on
    each domain of the pair, every seed, scored on the pair's val split; the first candidate at which
    `learns_everywhere` holds is chosen. None does: the last one, with `met` False (the verdict says so).
    `measure(rank, steps) -> seed -> domain -> val accuracy` replaces the training (tests)."""
    majority = majority_baselines(plan, split="val", domains=plan.pair)

    def train(rank: int, steps: int) -> dict[int, dict[str, float]]:
        lora = {"lora": {"r": rank, "alpha": 2.0 * rank}}
        scores: dict[int, dict[str, float]] = {}
        for seed in seeds:
            for domain in plan.pair:
                name = f"select_r{rank}_s{steps}_{domain}_seed{seed}"
                config = _run_config(plan, out, name, [domain], steps, [], _adapter_overrides(plan, lora, base_model),
                                     seed, split="val", evaluated=plan.pair)
                result = _fit_and_test("lora.yaml", config, name, name, [domain], out, seed)
                scores.setdefault(seed, {})[domain] = result.metrics[f"test/{domain}/exact_match"]
        return scores

    tried = []
    for rank, steps in progress(plan.candidates, "conflict: choosing rank and steps on val"):
        scores = (measure or train)(rank, steps)
        met = learns_everywhere(scores, majority, plan.pair)
        tried.append({"rank": rank, "steps": steps, "val": {str(k): v for k, v in scores.items()}, "met": met})
        if met:
            break
    chosen = tried[-1]
    return {"rank": chosen["rank"], "steps": chosen["steps"], "met": chosen["met"], "tried": tried,
            "majority_val": majority}


def run(out: Path, plan: Plan, base: Path | None = None, reuse: Path | None = None) -> tuple[dict[str, Any], str]:
    """One seed (`plan.seed`) of the experiment in `out`: the base (trained in `base`, default OUT/base, unless
    it or `reuse` holds one of this base plan), then every adapter run. Returns the summary and its table."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    base_model, base_result = train_base(plan, base or out / "base", out, reuse)
    results: list[RunResult] = [base_result] if base_result else []
    runs = adapter_runs(plan)
    for name, label, shipped, train_domains, model in progress(runs, f"conflict runs, seed {plan.seed}"):
        callbacks = [{"class_path": "lightning_moe.callbacks.SaveAdapters",
                      "init_args": {"dirpath": str(out / "adapters" / name)}}]
        if shipped == "mole.yaml":
            callbacks.append({"class_path": "lightning_moe.callbacks.RoutingStatistics"})
        config = _run_config(plan, out, name, train_domains, plan.steps, callbacks,
                             _adapter_overrides(plan, model, base_model), plan.seed)
        results.append(_fit_and_test(shipped, config, name, label, train_domains, out, plan.seed,
                                     answer_routing if shipped == "mole.yaml" else None))
    summary = summarise(plan, results, majority_baselines(plan))
    summary["seconds"] = time.perf_counter() - start
    return summary, markdown(summary)


def majority_baselines(plan: Plan, root: Path | None = None, split: str = "test",
                       domains: list[str] | None = None) -> dict[str, float]:
    """Domain -> exact match of always giving the most frequent answer, on the samples every run is scored on
    (the first `plan.eval_samples` of the domain's test split, or `plan.val_samples` of val): the score of a
    constant answer."""
    root = root or resolve_data_path(DATA_ROOT)
    scores = {}
    for domain in plan.domains if domains is None else domains:
        path = root / domain / f"{split}.jsonl"
        records = read_llava_records(path)[: plan.val_samples if split == "val" else plan.eval_samples]
        answers = [[m.content for m in parse_record(r, root, path, i + 1).messages if m.role == "assistant"][-1]
                   for i, r in enumerate(records)]
        scores[domain] = majority_answer_score(answers)
    return scores


def learnt_domains(alone: dict[str, float], majority: dict[str, float], margin: float = CONFLICT_MARGIN) -> list[str]:
    """Domains where plain LoRA alone scores at least `margin` above the majority-answer score."""
    return [d for d in alone if alone[d] - majority[d] >= margin - TOLERANCE]


def conflicted_domains(alone: dict[str, float], mixture: dict[str, float], majority: dict[str, float],
                       margin: float = CONFLICT_MARGIN) -> list[str]:
    """Domains that plain LoRA learns alone (`learnt_domains`) and loses on the mixture (at least `margin`
    below the alone run). One constant answer alone against another on the mixture is no conflict: the
    domain was never learnt."""
    return [d for d in learnt_domains(alone, majority, margin) if alone[d] - mixture[d] >= margin - TOLERANCE]


def summarise(plan: Plan, results: list[RunResult], majority: dict[str, float]) -> dict[str, Any]:
    by_name = {r.name: r for r in results}
    acc = {r.name: accuracy(r, plan.domains) for r in results}
    alone = {d: acc[f"lora_{d}"][d] for d in plan.domains}
    mixture = acc["lora_mixture"]
    drop = {d: alone[d] - mixture[d] for d in plan.domains}
    conflicted = conflicted_domains(alone, mixture, majority)
    learnt_alone = learnt_domains(alone, majority)
    # share of plain LoRA's loss (alone -> mixture) on the conflicted domains that a run wins back
    lost = sum(drop[d] for d in conflicted)
    contenders = {"lora4x": "lora4x_mixture", **{f"mole{e}": f"mole{e}_mixture" for e in plan.experts},
                  **({"oracle": "oracle_mixture"} if "oracle_mixture" in by_name else {})}
    recovered = {name: (sum(acc[run][d] - mixture[d] for d in conflicted) / lost if lost else None)
                 for name, run in contenders.items()}
    lora_step = by_name["lora_mixture"].step_time_s
    ratios = {f"mole{e}": (by_name[f"mole{e}_mixture"].step_time_s / lora_step
                           if by_name[f"mole{e}_mixture"].step_time_s and lora_step else None)
              for e in plan.experts}
    verdicts = {}
    for name, ratio in ratios.items():
        if not conflicted:
            verdicts[name] = "no conflict shown"
        elif recovered[name] >= 0.5 and ratio is not None and ratio <= 1.25:
            verdicts[name] = "confirmed"
        elif recovered[name] >= 0.2:
            verdicts[name] = "partly confirmed"
        else:
            verdicts[name] = "not confirmed"
    distinct = set(verdicts.values())
    verdict = distinct.pop() if len(distinct) == 1 else "partly confirmed (depends on the number of experts)"
    if not learnt_alone:
        verdict = ("no conflict shown: plain LoRA alone beats the majority answer on no domain by the margin "
                   "(nothing learnt to lose), so nothing to mitigate")
    elif not conflicted:
        verdict = ("no conflict shown: plain LoRA on the mixture loses no domain it learns alone by the margin, "
                   "so nothing to mitigate")
    summary = {
        "plan": asdict(plan), "runs": [asdict(r) for r in results], "majority_answer": majority,
        "alone": alone, "learnt_alone": learnt_alone, "drop_mixture_vs_alone": drop, "conflicted_domains": conflicted,
        "recovered_share": recovered, "mole_step_time_ratio": ratios, "verdicts": verdicts, "verdict": verdict,
    }
    summary["diagnosis"] = diagnosis(summary)
    return summary


# the share of plain LoRA's loss a run must win back to count as winning it back / as winning nothing back
WON_BACK, NOTHING_BACK = 0.5, 0.2


def diagnosis(summary: dict[str, Any]) -> str:
    """Why MoLE does or does not win back the conflict, from the oracle-routed MoLE (one expert per domain,
    routed by the domain id) against the learnt routers: `router` (the oracle wins the loss back, no learnt
    router does), `capacity` (even the oracle wins back less than a fifth: experts routed by domain do not
    hold the domains apart at this rank and these steps), `none` (a learnt router does as well as it needs)."""
    shares = summary["recovered_share"]
    if not summary["conflicted_domains"]:
        return "nothing to diagnose: no conflict shown"
    oracle = shares.get("oracle")
    learnt = [v for k, v in shares.items() if k.startswith("mole") and v is not None]
    best = max(learnt) if learnt else None
    if oracle is None:
        return "no diagnosis: no oracle-routed run"
    if best is not None and best >= WON_BACK:
        return f"no failure to diagnose: a learnt router wins back {100 * best:.0f}% (oracle {100 * oracle:.0f}%)"
    if oracle >= WON_BACK:
        return (f"router: routed by domain, the experts win back {100 * oracle:.0f}% of the loss; the learnt "
                f"routers at most {100 * (best or 0):.0f}%")
    if oracle < NOTHING_BACK:
        return (f"capacity: even routed by domain the experts win back only {100 * oracle:.0f}% of the loss "
                f"(learnt routers at most {100 * (best or 0):.0f}%)")
    return (f"partly router, partly capacity: routed by domain the experts win back {100 * oracle:.0f}%, the "
            f"learnt routers at most {100 * (best or 0):.0f}%")


def markdown(summary: dict[str, Any]) -> str:
    plan, domains = summary["plan"], summary["plan"]["domains"]
    header = "| run | trained on | " + " | ".join(domains) + " | mean | trainable params | step ms |"
    lines = [header, "|---" * (len(domains) + 5) + "|"]

    def row(label: str, trained: str, acc: dict[str, float], params: Any, step: Any) -> str:
        mean = sum(acc.values()) / len(acc)
        cells = " | ".join(f"{100 * acc[d]:.1f}" for d in domains)
        return f"| {label} | {trained} | {cells} | {100 * mean:.1f} | {params} | {step} |"

    for r in summary["runs"]:
        train_domains = r["details"]["train_domains"]
        trained = "mixture" if len(train_domains) == len(domains) and r["name"] != "base" else ", ".join(train_domains)
        step = f"{1000 * r['step_time_s']:.0f}" if r["step_time_s"] else "-"
        acc = {d: r["metrics"][f"test/{d}/exact_match"] for d in domains}
        lines.append(row(r["label"], trained, acc, f"{r['params_trainable']:,}", step))
    lines.append(row(f"LoRA r={plan['rank']}, each domain alone (diagonal)", "its own domain", summary["alone"], "-", "-"))
    lines.append(row("majority answer (one constant answer)", "-", summary["majority_answer"], "-", "-"))
    drops = ", ".join(f"{d} {100 * v:+.1f}" for d, v in summary["drop_mixture_vs_alone"].items())
    fmt = lambda v: "-" if v is None else f"{100 * v:.0f}%"  # noqa: E731
    recovered = ", ".join(f"{name} {fmt(v)}" for name, v in summary["recovered_share"].items())
    ratios = ", ".join(f"{name} {'-' if v is None else f'{v:.2f}'}" for name, v in summary["mole_step_time_ratio"].items())
    verdicts = ", ".join(f"{name}: {v}" for name, v in summary["verdicts"].items())
    return "\n".join([
        "# Data conflict: plain LoRA vs MoLE",
        "",
        f"Exact-match accuracy (%) on each domain's test split ({plan['eval_samples']} samples per domain); "
        f"{plan['steps']} training steps of batch {plan['batch_size']} per adapter run, seed {plan['seed']} (base: seed {plan['base_seed']}), "
        f"lr {plan['lr']}; base model: {plan['base_steps']} dense steps on the white-image domains. "
        "Step time: median wall-clock ms of a training step (forward, backward, optimizer) after 5 warm-up steps.",
        "",
        *lines,
        "",
        f"Accuracy lost by plain LoRA on the mixture against LoRA on the domain alone (points): {drops}.",
        f"Domains that LoRA learns alone (at least {100 * CONFLICT_MARGIN:.0f} points above the majority answer): "
        f"{', '.join(summary['learnt_alone']) or 'none'}; of those, domains that lose at least "
        f"{100 * CONFLICT_MARGIN:.0f} points on the mixture (the conflict): {', '.join(summary['conflicted_domains']) or 'none'}.",
        f"Share of that loss won back on those domains (plain LoRA on the mixture = 0%, alone = 100%): {recovered}.",
        f"MoLE step time / plain LoRA step time (same rank, this run; target <= 1.25): {ratios}.",
        "",
        f"Verdict on the paper's claim (MoLE mitigates the conflict at about the cost of plain LoRA): "
        f"**{summary['verdict']}** ({verdicts}; confirmed: MoLE wins back >= 50% and its step time is <= 1.25x; "
        "partly: >= 20%).",
        f"Diagnosis (oracle-routed MoLE against the learnt routers): {summary.get('diagnosis', '-')}.",
        *answer_routing_lines(summary),
        f"Wall time: {summary.get('seconds', 0):.0f} s.",
        "",
    ])


def answer_routing_lines(summary: dict[str, Any]) -> list[str]:
    """For each MoLE run: per layer, the expert that takes most of each domain's answer tokens (and the share)."""
    lines = []
    for r in summary["runs"]:
        routing = r["details"].get("answer_routing")
        if not routing:
            continue
        cells = []
        for layer, per_domain in routing.items():
            tops = ", ".join(f"{d} -> {max(range(len(v)), key=v.__getitem__)} ({100 * max(v):.0f}%)"
                             for d, v in per_domain.items())
            cells.append(f"{layer.removeprefix('llm.').removeprefix('model.')}: {tops}")
        lines.append(f"- {r['label']}, answer tokens' expert per domain: " + "; ".join(cells))
    return ["", "Routing of the answer tokens (test split, top-1 expert and its share of the domain's answer tokens):",
            *lines, ""] if lines else []


ROW_ORDER = ("lora_mixture", "lora4x_mixture", "oracle_mixture")


def combine(summaries: dict[int, dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """The results over seeds: per run and domain, test accuracy mean / range / standard error; the verdict and the
    diagnosis with how many seeds agree; the paired differences that decide them (on the pair's mean accuracy)."""
    seeds = sorted(summaries)
    first = summaries[seeds[0]]
    domains, pair = first["plan"]["domains"], [d for d in first["plan"].get("pair", []) if d in first["plan"]["domains"]]
    pair = pair or domains
    names = [r["name"] for r in first["runs"] if r["name"] != "base"]
    labels = {r["name"]: r["label"] for r in first["runs"]}
    acc = {name: {d: seed_stat([next(r for r in summaries[s]["runs"] if r["name"] == name)["metrics"][f"test/{d}/exact_match"]
                                for s in seeds]) for d in domains} for name in names}
    alone = {d: seed_stat([summaries[s]["alone"][d] for s in seeds]) for d in domains}
    pair_mean = {name: [statistics.fmean(next(r for r in summaries[s]["runs"] if r["name"] == name)["metrics"]
                                         [f"test/{d}/exact_match"] for d in pair) for s in seeds] for name in names}
    differences = {name: paired_difference(pair_mean[name], pair_mean["lora_mixture"])
                   for name in names if name != "lora_mixture" and not name.startswith("lora_")}
    differences["per-domain LoRA (upper bound)"] = paired_difference(
        [statistics.fmean(summaries[s]["alone"][d] for d in pair) for s in seeds], pair_mean["lora_mixture"])
    verdicts = [summaries[s]["verdict"] for s in seeds]
    diagnoses = [summaries[s].get("diagnosis", "-").split(":")[0] for s in seeds]
    combined = {"accuracy": acc, "alone": alone, "pair": pair, "pair_mean": pair_mean,
                "difference_vs_lora_mixture": differences, "verdict_per_seed": verdicts,
                "verdict_agreement": list(agreement(verdicts)), "diagnosis_per_seed": diagnoses,
                "diagnosis_agreement": list(agreement(diagnoses))}
    return combined, combined_markdown(combined, labels, domains, seeds)


def combined_markdown(combined: dict[str, Any], labels: dict[str, str], domains: list[str], seeds: list[int]) -> str:
    header = "| run | " + " | ".join(domains) + " |"
    lines = [f"## Over {len(seeds)} seed(s): test exact match (%), mean (min-max)", "", header,
             "|---" * (len(domains) + 1) + "|"]
    for name, per_domain in combined["accuracy"].items():
        lines.append(f"| {labels.get(name, name)} | " + " | ".join(spread(per_domain[d], 100, 1) for d in domains) + " |")
    lines.append("| per-domain LoRA (each domain's own adapter: the upper bound) | "
                 + " | ".join(spread(combined["alone"][d], 100, 1) for d in domains) + " |")
    pair = ", ".join(combined["pair"])
    lines += ["", f"Mean accuracy on the conflicting pair ({pair}) against plain LoRA on the mixture, seed by seed:"]
    lines += [f"- {difference_words(diff, labels.get(name, name), 100, ' points')}."
              for name, diff in combined["difference_vs_lora_mixture"].items()]
    lines += ["", f"Verdict over the seeds: {agreement_words(combined['verdict_per_seed'])}.",
              f"Diagnosis over the seeds (router / capacity / none): {agreement_words(combined['diagnosis_per_seed'])}.", ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = experiment_parser(__doc__.split("\n\n")[0],
                               reuse="an earlier output directory whose base model (DIR/base) is reused when it was "
                               "trained with the same base plan")
    parser.add_argument("--steps", type=int, default=None, help="training steps of each adapter run")
    parser.add_argument("--rank", type=int, default=None, help="LoRA / MoLE expert rank")
    return parser


VERDICT_RULE = (f"per seed, a domain of the pair is conflicted when plain LoRA alone is >= {100 * CONFLICT_MARGIN:.0f} "
                "points above its majority answer and plain LoRA on the mixture >= that much below the alone run; MoLE "
                f"is 'confirmed' when it wins back >= {100 * WON_BACK:.0f}% of that loss at <= 1.25x plain LoRA's step "
                f"time, 'partly' at >= {100 * NOTHING_BACK:.0f}%, else 'not confirmed'; the diagnosis compares the "
                "oracle-routed MoLE (router: the oracle wins it back, no learnt router does; capacity: even the "
                "oracle wins back < 20%). The verdict over seeds is the majority's, with the count of seeds that agree.")


def protocol(plan: Plan, seeds: list[int], chosen_by: str) -> Protocol:
    """The experiment's protocol (settings filled in once chosen)."""
    return Protocol(
        question="Does a mixture of LoRA experts (MoLE) win back what plain LoRA loses on conflicting domains, and "
                 "if not, is it the router or the experts' capacity?",
        seeds=list(seeds), selection_split="val", reported_split="test", selection=chosen_by,
        verdict_rule=VERDICT_RULE)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(build_parser(), argv)
    plan = QUICK if args.quick else Plan()
    resolve_data_path(DATA_ROOT)  # fail early, with the data layer's message, if the data is missing
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    reuse = args.reuse.resolve() / "base" if args.reuse else None
    given = {k: v for k, v in (("steps", args.steps), ("rank", args.rank)) if v is not None}
    if given:  # the user's setting: no selection, and the protocol says so
        plan = replace(plan, **given)
        chosen_by = "none: rank and steps given on the command line (not a pre-registered run)."
        settings: dict[str, Any] = {"rank": plan.rank, "steps": plan.steps}
    else:
        base_model, _ = train_base(plan, out / "base", out, reuse)  # once for the selection and every seed
        selection = select_setting(plan, args.seeds, base_model, out / "selection")
        plan = replace(plan, rank=selection["rank"], steps=selection["steps"])
        chosen_by = ("the first (rank, steps) of " + ", ".join(f"({r}, {n})" for r, n in plan.candidates) + " at "
                     f"which plain LoRA alone learns each of {', '.join(plan.pair)} (>= {100 * CONFLICT_MARGIN:.0f} "
                     "points above the majority answer on val) in every seed.")
        settings = {"rank": plan.rank, "steps": plan.steps,
                    "met": selection["met"] if selection["met"] else "NO candidate met the rule: the last one is used",
                    "val_scores": selection["tried"]}
    declared = protocol(plan, args.seeds, chosen_by)
    declared.settings = settings
    # one base for every seed (it has its own seed), in OUT/base
    return run_seeds(out, args.seeds, lambda workdir, seed: run(workdir, replace(plan, seed=seed), out / "base", reuse),
                     command_line("lightning_moe.experiments.conflict", argv), declared, combine)


if __name__ == "__main__":
    main()

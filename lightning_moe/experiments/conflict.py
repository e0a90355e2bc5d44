"""Does a mixture of LoRA experts mitigate data conflicts? (LLaVA-MoLE's question)

    python -m lightning_moe.experiments.conflict --out runs/conflict [--quick] [--seeds 0 1 ...] [--threads N]
        [--reuse EARLIER_OUT] [--steps N] [--rank R]

From one dense base model (configs/mole/base.yaml: trained on the white-image domains, saved
once under OUT/base and reused by every run and seed; `--reuse` takes it from an earlier output
directory trained with the same base plan), trains
at equal steps and seeds, through the CLI's classes (`lightning_moe.cli.main` with the shipped
configs plus a per-run config written to OUT/configs/):

- plain LoRA on each domain alone (configs/mole/lora.yaml, one run per domain),
- plain LoRA on the mixture of all the experiment's domains,
- plain LoRA with 4x the rank on the mixture,
- MoLE on the mixture (configs/mole/mole.yaml, same LoRA rank as plain LoRA),

then tests every run on every domain's test split (exact match) and writes OUT/results.json,
OUT/results.md (rows = runs; per-domain accuracy, mean, trainable parameters, median train step
time), each run's console output under OUT/logs/ and TensorBoard logs under OUT/tensorboard/<run>
(MoLE's domain x expert heat maps included). Several seeds: each seed's runs in OUT/seed<N>/.

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
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from ..data.records import parse_record, read_llava_records
from ..metrics import majority_answer_score
from ..paths import resolve_data_path, shipped_path
from . import (Run, RunResult, command_line, execute, experiment_parser, parse_args, progress, run_seeds)

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

    def base_signature(self) -> dict[str, Any]:
        return {"base_steps": self.base_steps, "batch_size": self.batch_size, "seed": self.base_seed}


# the smoke test: only the conflicting pair, a few steps on a few samples
QUICK = Plan(domains=["position_lr", "position_tb"], base_steps=3, steps=3, experts=[3], batch_size=8, eval_samples=8)


def accuracy(result: RunResult, domains: list[str]) -> dict[str, float]:
    """Domain -> test exact match of one run."""
    return {d: result.metrics[f"test/{d}/exact_match"] for d in domains}


def _data_config(plan: Plan, train_domains: list[str], seed: int) -> dict[str, Any]:
    """Train on `train_domains`, test on every domain of the plan (no validation during training)."""
    domains = {d: {"train": f"{d}/train.jsonl" if d in train_domains else None,
                   "test": f"{d}/test.jsonl" if d in plan.domains else None}
               for d in [*plan.domains, *(d for d in train_domains if d not in plan.domains)]}
    return {"class_path": "lightning_moe.data.DomainMixtureDataModule",
            "init_args": {"domains": domains, "batch_size": plan.batch_size, "eval_batch_size": 200,
                          "max_eval_samples_per_domain": plan.eval_samples, "seed": seed}}


def _run_config(plan: Plan, out: Path, name: str, train_domains: list[str], steps: int,
                callbacks: list[dict[str, Any]], model: dict[str, Any], seed: int) -> Path:
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
        "data": _data_config(plan, train_domains, seed),
    }
    path = out / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _fit_and_test(shipped: str, run_config: Path, name: str, label: str, train_domains: list[str],
                  out: Path, seed: int | None) -> RunResult:
    """The shipped config plus the run's own, trained and tested (`experiments.execute`), as a table row."""
    run = Run(name, ["--config", str(shipped_path(f"configs/mole/{shipped}")), "--config", str(run_config)],
              label=label, seed=seed)
    result = execute(run, out)
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
    return runs


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
        overrides = {**model, "backbone": {"pretrained": str(base_model)},
                     "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": plan.lr, "weight_decay": 0.0}}}
        config = _run_config(plan, out, name, train_domains, plan.steps, callbacks, overrides, plan.seed)
        results.append(_fit_and_test(shipped, config, name, label, train_domains, out, plan.seed))
    summary = summarise(plan, results, majority_baselines(plan))
    summary["seconds"] = time.perf_counter() - start
    return summary, markdown(summary)


def majority_baselines(plan: Plan, root: Path | None = None) -> dict[str, float]:
    """Domain -> exact match of always giving the most frequent answer, on the test samples every run is
    tested on (the first `plan.eval_samples` of the domain's test split): the score of a constant answer."""
    root = root or resolve_data_path(DATA_ROOT)
    scores = {}
    for domain in plan.domains:
        path = root / domain / "test.jsonl"
        records = read_llava_records(path)[: plan.eval_samples]
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
    contenders = {"lora4x": "lora4x_mixture", **{f"mole{e}": f"mole{e}_mixture" for e in plan.experts}}
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
    return {
        "plan": asdict(plan), "runs": [asdict(r) for r in results], "majority_answer": majority,
        "alone": alone, "learnt_alone": learnt_alone, "drop_mixture_vs_alone": drop, "conflicted_domains": conflicted,
        "recovered_share": recovered, "mole_step_time_ratio": ratios, "verdicts": verdicts, "verdict": verdict,
    }


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
        f"Wall time: {summary.get('seconds', 0):.0f} s.",
        "",
    ])


def build_parser() -> argparse.ArgumentParser:
    parser = experiment_parser(__doc__.split("\n\n")[0],
                               reuse="an earlier output directory whose base model (DIR/base) is reused when it was "
                               "trained with the same base plan")
    parser.add_argument("--steps", type=int, default=None, help="training steps of each adapter run")
    parser.add_argument("--rank", type=int, default=None, help="LoRA / MoLE expert rank")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(build_parser(), argv)
    plan = QUICK if args.quick else Plan()
    plan = replace(plan, **{k: v for k, v in (("steps", args.steps), ("rank", args.rank)) if v is not None})
    resolve_data_path(DATA_ROOT)  # fail early, with the data layer's message, if the data is missing
    out = args.out.resolve()
    reuse = args.reuse.resolve() / "base" if args.reuse else None
    # one base for every seed (it has its own seed), in OUT/base
    return run_seeds(out, args.seeds, lambda workdir, seed: run(workdir, replace(plan, seed=seed), out / "base", reuse),
                     command_line("lightning_moe.experiments.conflict", argv))


if __name__ == "__main__":
    main()

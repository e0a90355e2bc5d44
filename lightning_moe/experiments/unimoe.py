"""Do modality-specific experts help? (Uni-MoE's question)

    python -m lightning_moe.experiments.unimoe --out runs/unimoe_exp [--quick] [--seeds 0 1 2] [--threads N]

Per seed, through the CLI's classes (`lightning_moe.cli.main` with the shipped configs/unimoe/ files plus
a per-run config written to OUT/configs/):

1. stage 1 (configs/unimoe/align.yaml) on the shipped audio, video and cross-modal mixture (data/media),
   twice: with video frames kept in order (`concat`, the shipped default) and averaged (`mean`, the
   reference): the video pooling comparison (`motion` needs frame order);
2. stage 2, one run per modality from the `concat` stage-1 output (experts.yaml, experts_video.yaml,
   experts_image.yaml);
3. at equal steps on the mixture, from the same stage-1 output:
   - Uni-MoE: stage 3 (moe.yaml), each expert from its modality's stage-2 FFN (+ the dense FFN);
   - copies: the same MoE recipe with every expert a copy of the stage-1 FFN (MoE-LLaVA's upcycling);
   - dense: the same LoRA (r=8, alpha=16 on attention and the MLP projections) without experts.

Every arm is tested on every domain's test split (exact match). Writes OUT/results.json, OUT/results.md
(per-domain accuracy per arm, mean and range over seeds, the share of each modality's routed slots that
went to its own expert, the pooling comparison) and the verdict by `verdict` (rules in code).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from ..paths import resolve_data_path, shipped_path
from . import (Run, RunResult, command_line, execute, experiment_parser, parse_args, progress, run_seeds,
               write_results)

DATA_ROOT = "data/media"
AUDIO, VIDEO, CROSS = ("beeps", "pitch", "longer"), ("frames", "motion"), ("beeps_shapes",)
DOMAINS = (*AUDIO, *VIDEO, *CROSS)
ARMS = ("unimoe", "copies", "dense")
# 2 points: below it two arms' mean accuracies over 6 domains x 200 test samples count as equal
MARGIN = 0.02
TOLERANCE = 1e-9


@dataclass
class Plan:
    align_steps: int = 600
    expert_steps: int = 300
    steps: int = 600  # every stage-3 arm
    batch_size: int = 64
    eval_samples: int = 200  # test samples per domain
    seed: int = 0


QUICK = Plan(align_steps=2, expert_steps=2, steps=2, batch_size=4, eval_samples=4)


def _config(plan: Plan, out: Path, name: str, steps: int, model: dict[str, Any], callbacks: list[dict[str, Any]],
            data: dict[str, Any] | None = None) -> Path:
    """The per-run overrides on top of a shipped config (merged key by key into it)."""
    config = {
        "seed_everything": plan.seed,
        "trainer": {
            "max_steps": steps, "limit_val_batches": 0, "num_sanity_val_steps": 0, "enable_checkpointing": False,
            "enable_progress_bar": False, "enable_model_summary": False, "log_every_n_steps": max(1, min(20, steps)),
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(out / "tensorboard"), "name": name, "version": ""}},
            "callbacks": [{"class_path": "lightning_moe.callbacks.StageProfile", "init_args": {"warmup_steps": 5}},
                          *callbacks],
        },
        "model": {"init_args": model},
        "data": {"init_args": {"batch_size": plan.batch_size, "eval_batch_size": 200, "seed": plan.seed,
                               "max_eval_samples_per_domain": plan.eval_samples, **(data or {})}},
    }
    path = out / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _save(directory: Path) -> dict[str, Any]:
    return {"class_path": "lightning_moe.callbacks.SavePretrained", "init_args": {"dirpath": str(directory)}}


def _run(shipped: str, config: Path, name: str, label: str, out: Path, seed: int, test: bool = True) -> RunResult:
    run = Run(name, ["--config", str(shipped_path(f"configs/{shipped}")), "--config", str(config)], label=label,
              seed=seed, test=test)
    return execute(run, out)


def run(out: Path, plan: Plan) -> tuple[dict[str, Any], str]:
    """One seed: both stage-1 runs, the stage-2 runs, the three stage-3 arms. Returns the summary and its table."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    models = out / "models"
    results: dict[str, RunResult] = {}
    bar = progress(8, f"unimoe runs, seed {plan.seed}")
    for pooling in ("concat", "mean"):
        name = f"align_{pooling}"
        config = _config(plan, out, name, plan.align_steps, {"backbone": {"video_pooling": pooling}},
                         [_save(models / name)])
        results[name] = _run("unimoe/align.yaml", config, name, f"stage 1, video {pooling}", out, plan.seed)
        bar.update()
    base = str(models / "align_concat")
    for modality, shipped in (("audio", "experts.yaml"), ("video", "experts_video.yaml"), ("image", "experts_image.yaml")):
        name = f"experts_{modality}"
        config = _config(plan, out, name, plan.expert_steps, {"backbone": {"pretrained": base}}, [_save(models / name)])
        results[name] = _run(f"unimoe/{shipped}", config, name, f"stage 2, {modality}", out, plan.seed, test=False)
        bar.update()
    routing = [{"class_path": "lightning_moe.callbacks.RoutingStatistics"}]
    experts = {m: str(models / f"experts_{m}") for m in ("image", "audio", "video")}
    arms = {
        "unimoe": ("unimoe/moe.yaml", "Uni-MoE (modality experts)",
                   {"backbone": {"pretrained": base}, "experts": experts}, routing),
        "copies": ("unimoe/moe.yaml", "MoE, experts copies of one FFN",
                   {"backbone": {"pretrained": base}, "experts": {},
                    "moe": {"experts": ["dense", "dense", "dense", "dense"]}}, routing),
        "dense": ("mole/lora.yaml", "dense + LoRA (no experts)",
                  {"backbone": {"pretrained": base}, "pope_domains": [],
                   "lora": {"r": 8, "alpha": 16.0, "dropout": 0.0, "layers": "all",
                            "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
                   "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 5.0e-4, "weight_decay": 0.0}}},
                  []),
    }
    # lora.yaml reads data/shapes: the dense arm gets the mixture's data options explicitly
    media = {"root": DATA_ROOT, "tokenizer": "data/media_tokenizer", "domains": None, "audio_chunk_seconds": 1.0,
             "audio_max_chunks": 1, "video_num_frames": 4}
    for arm, (shipped, label, model, callbacks) in arms.items():
        config = _config(plan, out, arm, plan.steps, model, callbacks, media if arm == "dense" else None)
        results[arm] = _run(shipped, config, arm, label, out, plan.seed)
        bar.update()
    bar.close()
    summary = summarise(plan, results)
    summary["seconds"] = time.perf_counter() - start
    return summary, combine([summary])[1]


def accuracy(result: RunResult) -> dict[str, float]:
    return {d: result.metrics[f"test/{d}/exact_match"] for d in DOMAINS if f"test/{d}/exact_match" in result.metrics}


def summarise(plan: Plan, results: dict[str, RunResult]) -> dict[str, Any]:
    acc = {name: accuracy(r) for name, r in results.items() if r.metrics}
    share = {m: results["unimoe"].metrics.get(f"test/routing/{m}_own_expert_share")
             for m in ("image", "audio", "video")}
    return {"plan": asdict(plan), "runs": {n: asdict(r) for n, r in results.items()}, "accuracy": acc,
            "mean": {arm: sum(acc[arm].values()) / len(acc[arm]) for arm in ARMS},
            "own_expert_share": share}


def verdict(means: dict[str, list[float]]) -> str:
    """Rules: per seed, Uni-MoE's mean test accuracy against each baseline arm's. `confirmed`: Uni-MoE is at least
    MARGIN above both baselines on the mean over seeds and above each of them in every seed; `partly`: at least
    MARGIN above one of them on the mean over seeds; else `not shown`."""
    n = len(means["unimoe"])
    gains = {arm: [means["unimoe"][i] - means[arm][i] for i in range(n)] for arm in ("copies", "dense")}
    mean_gain = {arm: sum(g) / n for arm, g in gains.items()}
    beats = {arm: mean_gain[arm] >= MARGIN - TOLERANCE for arm in gains}
    if all(beats.values()) and all(g > 0 for gs in gains.values() for g in gs):
        return "confirmed"
    if any(beats.values()):
        return "partly"
    return "not shown"


def _range(values: list[float]) -> str:
    mean = sum(values) / len(values)
    return f"{100 * mean:.1f}" if len(values) == 1 else f"{100 * mean:.1f} [{100 * min(values):.1f}, {100 * max(values):.1f}]"


def combine(summaries: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """Mean and range over seeds of every arm's per-domain accuracy, the verdict, the pooling comparison."""
    rows = [*ARMS, "align_concat", "align_mean"]
    per = {row: {d: [s["accuracy"][row][d] for s in summaries] for d in summaries[0]["accuracy"][row]} for row in rows}
    means = {arm: [s["mean"][arm] for s in summaries] for arm in ARMS}
    shares = {m: [s["own_expert_share"][m] for s in summaries if s["own_expert_share"][m] is not None]
              for m in ("image", "audio", "video")}
    result = {"per_domain": per, "mean": means, "own_expert_share": shares, "verdict": verdict(means),
              "margin": MARGIN}
    labels = {"unimoe": "Uni-MoE (modality experts)", "copies": "MoE, experts copies of one FFN",
              "dense": "dense + LoRA (no experts)", "align_concat": "stage 1, video concat",
              "align_mean": "stage 1, video mean"}
    header = "| run | " + " | ".join(DOMAINS) + " | mean |"
    lines = [header, "|---" * (len(DOMAINS) + 2) + "|"]
    for row in rows:
        cells = [(_range(per[row][d]) if d in per[row] else "-") for d in DOMAINS]
        mean = [sum(s["accuracy"][row].values()) / len(s["accuracy"][row]) for s in summaries]
        lines.append(f"| {labels[row]} | " + " | ".join(cells) + f" | {_range(mean)} |")
    share_text = ", ".join(f"{m} {_range(v)}%" for m, v in shares.items() if v)
    plan = summaries[0]["plan"]
    text = "\n".join([
        "# Uni-MoE: do modality-specific experts help?", "",
        f"Test exact match (%) per domain ({plan['eval_samples']} samples each), mean [min, max] over "
        f"{len(summaries)} seed(s); stage 1: {plan['align_steps']} steps, stage 2: {plan['expert_steps']} per modality, "
        f"each stage-3 arm: {plan['steps']} steps of batch {plan['batch_size']}.", "",
        *lines, "",
        f"Share of each modality's routed token slots (all MoE layers) that Uni-MoE sends to that modality's expert "
        f"(1 of 4 experts, top-2: routing blind to modality gives 25%): {share_text or 'none recorded'}.",
        f"Video pooling: `motion` (needs frame order) with concat {_range(per['align_concat'].get('motion', [0.0]))}, "
        f"with mean {_range(per['align_mean'].get('motion', [0.0]))} (chance 50).", "",
        f"Verdict on \"modality-specific experts help\": **{result['verdict']}** (confirmed: Uni-MoE's mean accuracy is "
        f"at least {100 * MARGIN:.0f} points above both the copies and the dense arm over seeds and above each in every "
        f"seed; partly: at least {100 * MARGIN:.0f} points above one of them).", "",
    ])
    return result, text


def build_parser() -> argparse.ArgumentParser:
    return experiment_parser(__doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(build_parser(), argv)
    plan = QUICK if args.quick else Plan()
    resolve_data_path(DATA_ROOT)  # fail early, with the data layer's message, if the data is missing
    out = args.out.resolve()
    summaries: list[dict[str, Any]] = []

    def one_seed(workdir: Path, seed: int) -> tuple[dict[str, Any], str]:
        summary, table = run(workdir, replace(plan, seed=seed))
        summaries.append(summary)
        return summary, table

    command = command_line("lightning_moe.experiments.unimoe", argv)
    written = run_seeds(out, args.seeds, one_seed, command)
    # the table over seeds (mean and range) and the verdict replace the per-seed tables in OUT/results.*
    combined, text = combine(summaries)
    written = write_results(out, {**written, "combined": combined}, text, command)
    if len(args.seeds) > 1:
        print(text)
    return written


if __name__ == "__main__":
    main()

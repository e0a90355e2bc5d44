"""Does MoRA reduce forgetting in continual instruction tuning? MoRA against plain-LoRA baselines.

    python -m lightning_moe.experiments.continual --out DIR [--quick]

1. A short dense pre-training of the tiny model on `colour` (`configs/mora/pretrain.yaml`), the base
   every run below starts from (a tiny preset has no pretrained vision tower, so adapters alone on
   a random model would learn little).
2. The task sequence of `configs/mora/continual.yaml` (count -> position_lr -> position_tb), each
   method for the same steps per task, evaluating every task after each task:
   - `mora`: MoRA rank-1 experts, new ranks per task, earlier ranks frozen (the config as shipped);
   - `lora_sequential`: one plain LoRA trained task after task (forgetting expected);
   - `lora_joint`: one LoRA on the mixture of all tasks (the multi-task upper bound);
   - `lora_task_specific`: a LoRA per task, selected by the given task id (an oracle).

Every run goes through `lightning_moe.cli.main` with the shipped configs and command-line
overrides (no second training loop). The runs work inside DIR (relative `runs/...` paths of the
configs land there; shipped data paths fall back to the repository), so DIR also holds the
TensorBoard logs (`DIR/runs/mora/<method>`). Writes `DIR/results.json` and `DIR/results.md`:
the accuracy matrices, Last / Avg / Transfer / BWT / forgetting per method, adapter parameters,
active ranks per token. `--quick` is the smoke version the tests run (a few steps, few samples).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lightning_moe.cli import main as cli_main
from lightning_moe.metrics import accuracy_table, continual_scores
from lightning_moe.experiments import working_directory
from lightning_moe.paths import REPO_ROOT

PRETRAIN = REPO_ROOT / "configs/mora/pretrain.yaml"
CONTINUAL = REPO_ROOT / "configs/mora/continual.yaml"
LORA = ["--model=lightning_moe.methods.ContinualLoRA"]
# method -> overrides of configs/mora/continual.yaml (same data, steps, targets, rank and optimizer)
METHODS: dict[str, list[str]] = {
    "mora": [],
    "lora_sequential": [*LORA, "--model.init_args.strategy=sequential"],
    "lora_joint": [*LORA, "--model.init_args.strategy=joint", "--data.init_args.schedule=joint"],
    "lora_task_specific": [*LORA, "--model.init_args.strategy=task_specific"],
}
COMMON = ["--trainer.enable_progress_bar=false"]
# smoke version: a few steps and samples; the shipped test files double as small train files
QUICK_PRETRAIN = ["--trainer.max_steps=2", "--trainer.val_check_interval=2", "--data.init_args.batch_size=4",
                  "--data.init_args.eval_batch_size=8", "--data.init_args.max_eval_samples_per_domain=4",
                  "--data.init_args.domains.colour.train=colour/test.jsonl"]
QUICK_CONTINUAL = ["--data.init_args.steps_per_task=2", "--data.init_args.batch_size=4",
                   "--data.init_args.eval_batch_size=8", "--data.init_args.max_eval_samples_per_domain=4",
                   "--data.init_args.order=null",
                   '--data.init_args.tasks=[{"name": "count", "train": "count/test.jsonl", "test": "count/test.jsonl"}, '
                   '{"name": "position_lr", "train": "position_lr/test.jsonl", "test": "position_lr/test.jsonl"}, '
                   '{"name": "position_tb", "train": "position_tb/test.jsonl", "test": "position_tb/test.jsonl"}]']


@dataclass
class MethodResult:
    method: str
    tasks: list[str]
    accuracy: list[list[float]]  # acc[i][j]: accuracy on task j after training task i
    last: float
    avg: float
    transfer: float
    bwt: float
    forgetting: float
    adapter_params_total: int  # adapter parameters held at the end (all tasks)
    adapter_params_per_task: int  # adapter parameters trained on one task
    active_ranks_per_token: float  # average over real tokens and adapted layers, last evaluation
    seconds: float
    # MoRA: evaluated task -> active ranks per token from each training task's rank block (last evaluation)
    rank_usage: dict[str, list[float]] | None = None


def run_method(method: str, quick: bool, seed: int = 0) -> MethodResult:
    start = time.time()
    args = ["fit", "--config", str(CONTINUAL), *COMMON, *METHODS[method], f"--trainer.logger.init_args.name={method}",
            f"--seed_everything={seed}"]
    cli = cli_main(args + (QUICK_CONTINUAL if quick else []))
    model = cli.model
    matrix = model.accuracy.matrix()
    if matrix.shape[0] != len(model.task_names):
        raise RuntimeError(f"{method}: only {matrix.shape[0]} of {len(model.task_names)} rows were evaluated")
    scores = continual_scores(matrix)
    counts = model.adapter_parameter_counts()
    if "val/active_ranks" in cli.trainer.callback_metrics:  # MoRA: measured
        ranks = float(cli.trainer.callback_metrics["val/active_ranks"])
    else:  # plain LoRA: every rank of the one adapter in use is active for every token
        ranks = float(model.lora.r)
    usage = {task: u.tolist() for task, u in model.rank_usage.items()} if hasattr(model, "rank_usage") else None
    return MethodResult(method, list(model.task_names), matrix.tolist(), **scores.as_dict(),
                        adapter_params_total=counts["total"], adapter_params_per_task=counts["per_task"],
                        active_ranks_per_token=ranks, seconds=round(time.time() - start, 1), rank_usage=usage)


def _fmt(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.3f}"


def results_markdown(results: list[MethodResult], pretrain_seconds: float, quick: bool, seed: int = 0) -> str:
    lines = [
        f"# Continual instruction tuning: MoRA vs plain LoRA{' (--quick smoke run)' if quick else ''}, seed {seed}",
        "",
        f"Task sequence: {' -> '.join(results[0].tasks)}. Accuracy = exact match of greedy answers on each task's "
        "test split. BWT < 0 and forgetting > 0 mean forgetting.",
        "",
        "| method | Last | Avg | Transfer | BWT | forgetting | adapter params (total / per task) | active ranks per token | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r.method} | {_fmt(r.last)} | {_fmt(r.avg)} | {_fmt(r.transfer)} | {_fmt(r.bwt)} | "
                     f"{_fmt(r.forgetting)} | {r.adapter_params_total} / {r.adapter_params_per_task} | "
                     f"{r.active_ranks_per_token:.2f} | {r.seconds:.0f} |")
    lines += ["", f"Dense pre-training of the shared base: {pretrain_seconds:.0f} s.", ""]
    for r in results:
        lines += [f"## {r.method}: acc[i, j]", "", accuracy_table(r.accuracy, r.tasks), ""]
        if r.rank_usage:
            lines += [f"{r.method}: active ranks per token on each task's test data, by the task that trained them "
                      "(after the last task; mean over layers)", "",
                      "| evaluated \\ ranks of | " + " | ".join(r.tasks) + " |", "|---" * (len(r.tasks) + 1) + "|"]
            lines += [f"| {t} | " + " | ".join(f"{v:.2f}" for v in r.rank_usage[t]) + " |" for t in r.tasks
                      if t in r.rank_usage]
            lines.append("")
    return "\n".join(lines)


def run(out: str | Path, quick: bool = False, methods: list[str] | None = None, seed: int = 0) -> list[MethodResult]:
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    methods = methods or list(METHODS)
    with working_directory(out):
        start = time.time()
        cli_main(["fit", "--config", str(PRETRAIN), *COMMON, f"--seed_everything={seed}",
                  *(QUICK_PRETRAIN if quick else [])])
        pretrain_seconds = time.time() - start
        results = [run_method(m, quick, seed) for m in methods]
    (out / "results.json").write_text(json.dumps(
        {"quick": quick, "seed": seed, "pretrain_seconds": round(pretrain_seconds, 1),
         "methods": [asdict(r) for r in results]},
        indent=2))
    (out / "results.md").write_text(results_markdown(results, pretrain_seconds, quick, seed))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory (results, TensorBoard logs, the base model)")
    parser.add_argument("--quick", action="store_true", help="smoke version: a few steps and samples")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), help="a subset of the methods (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pre-training and of every run")
    args = parser.parse_args(argv)
    run(args.out, args.quick, args.methods, args.seed)
    print((Path(args.out) / "results.md").read_text())


if __name__ == "__main__":
    main()

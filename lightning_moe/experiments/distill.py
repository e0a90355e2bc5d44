"""Does LLaVA-MoD's distillation help? Teacher, distilled sparse student, undistilled student.

    python -m lightning_moe.experiments.distill --out DIR [--quick] [--threads N]

Runs, through the CLI (`lightning_moe.cli.main` with the shipped configs, in DIR so that every
`runs/...` path lands there):

1. the teacher (`configs/mod/teacher.yaml`: a larger dense model, instruct stage);
2. the student through `mimic_dense`, `mimic_sparse` and `preference` (`configs/mod/*.yaml`);
3. the same student without a teacher at equal steps: MoE-tuning's instruct stage for as many
   steps as mimic_dense, then its moe stage for as many as mimic_sparse + preference (configs
   derived from the mimic ones, changing only the method, so data, sizes and optimizer match).

Each run is tested on the test split (per-domain exact match from greedy generation, POPE
accuracy / F1 / yes-ratio). Writes DIR/results.json, DIR/results.md (tables) and the TensorBoard
logs of every run under DIR/runs/mod/. `--quick` is the smoke version (a few steps, few samples).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml

from ..callbacks import StageProfile
from ..cli import main as cli_main
from ..models import parameter_counts
from ..paths import REPO_ROOT
from . import working_directory

CONFIGS = REPO_ROOT / "configs" / "mod"
DOMAINS = ("count", "colour", "pope", "position_lr", "position_tb")
# keys of MoDDistillation that MoETuning does not take (the undistilled baseline drops them)
MOD_ONLY_KEYS = ("teacher", "teacher_dtype", "teacher_tokenizer", "mimic", "preference")
# the smoke version: every piece runs, nothing is learnt
QUICK = ["--trainer.max_steps=2", "--trainer.limit_train_batches=2", "--trainer.limit_test_batches=1",
         "--trainer.enable_progress_bar=false", "--data.init_args.batch_size=4", "--data.init_args.eval_batch_size=8",
         "--data.init_args.max_eval_samples_per_domain=8"]
# ... on two domains with small train files (the val split), so data setup takes a fraction of a second
QUICK_DOMAINS = ("count", "pope")


def quick_data(preference: bool) -> list[str]:
    train = "preference/{d}/val.jsonl" if preference else "{d}/val.jsonl"
    domains = {d: {"train": train.format(d=d), "val": f"{d}/val.jsonl", "test": f"{d}/test.jsonl"} for d in QUICK_DOMAINS}
    return [f"--data.init_args.domains={json.dumps(domains)}"]


# validation during fit is skipped: every run is tested once at its end
NO_VALIDATION = ["--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0"]


@dataclass
class RunResult:
    name: str  # teacher | mimic_dense | mimic_sparse | preference | baseline_instruct | baseline_moe
    method: str
    stage: str
    steps: int
    wall_s: float  # fit + test, data setup included
    step_time_s: float | None  # median training step
    peak_memory_mb: float | None
    memory_kind: str  # cpu_peak_rss (whole process) | cuda_max_allocated
    params_total: int
    params_activated: int
    metrics: dict[str, float] = field(default_factory=dict)  # test/<domain>/<metric>, test/exact_match


def fit_and_test(name: str, config: Path, overrides: list[str]) -> RunResult:
    """One CLI `fit` with `config` + overrides, then `test` with the same trainer and model."""
    start = time.perf_counter()
    cli = cli_main(["fit", "--config", str(config), *overrides])
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    profile = next((cb for cb in cli.trainer.callbacks if isinstance(cb, StageProfile)), StageProfile())
    counts = parameter_counts(cli.model.model)
    result = RunResult(
        name=name, method=type(cli.model).__name__, stage=cli.model.stage, steps=cli.trainer.global_step,
        wall_s=time.perf_counter() - start, step_time_s=profile.step_time_s, peak_memory_mb=profile.peak_memory_mb,
        memory_kind=profile.memory_kind, params_total=counts.total, params_activated=counts.activated,
        metrics={k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("test/")},
    )
    del cli
    gc.collect()  # the next run's peak memory should not hold this one's model
    return result


def baseline_config(source: Path, target: Path, name: str, stage: str, steps: int, pretrained: str | None) -> Path:
    """The mimic config `source` as MoE-tuning without a teacher: same student, data and optimizer."""
    config = yaml.safe_load(source.read_text())
    init = config["model"]["init_args"]
    for key in MOD_ONLY_KEYS:
        init.pop(key, None)
    config["model"]["class_path"] = "lightning_moe.methods.MoETuning"
    init["stage"] = stage
    if pretrained:
        init["backbone"] = {"pretrained": pretrained}
    trainer = config["trainer"]
    trainer["max_steps"] = trainer["val_check_interval"] = steps
    trainer["logger"]["init_args"]["name"] = name
    for callback in trainer["callbacks"]:
        if callback["class_path"].endswith("SavePretrained"):
            callback["init_args"]["dirpath"] = f"runs/mod/{name}/model"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(f"# derived from {source.relative_to(REPO_ROOT)} by lightning_moe/experiments/distill.py\n"
                      + yaml.safe_dump(config, sort_keys=False))
    return target


def reuse_teacher(previous: Path, out: Path) -> RunResult:
    """The teacher of an earlier run of this experiment: its model is copied, its results row is kept."""
    source = previous / "runs" / "mod" / "teacher" / "model"
    summary_file = previous / "results.json"
    if not source.is_dir() or not summary_file.is_file():
        raise FileNotFoundError(f"{previous} holds no finished run of this experiment ({source}, {summary_file})")
    shutil.copytree(source, out / "runs" / "mod" / "teacher" / "model", dirs_exist_ok=True)
    row = next(r for r in json.loads(summary_file.read_text())["runs"] if r["name"] == "teacher")
    return RunResult(**row)


def run(out: Path, quick: bool = False, mimic_lm_weight: float | None = None, teacher_from: Path | None = None) -> dict:
    """All runs (module docstring); `mimic_lm_weight` overrides the mimic stages' `mimic.lm_weight`,
    `teacher_from` reuses the teacher of an earlier output directory instead of training one."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # resolved here, against the caller's directory: inside working_directory(out) a relative path
    # would be looked up under `out`
    teacher_from = Path(teacher_from).resolve() if teacher_from is not None else None
    overrides = NO_VALIDATION + (QUICK if quick else [])
    results: dict[str, RunResult] = {}
    start = time.perf_counter()
    with working_directory(out):  # every runs/... path of the configs (and the stage hand-offs) lands in `out`
        if teacher_from is not None:
            results["teacher"] = reuse_teacher(teacher_from, out)
        for stage in ("teacher", "mimic_dense", "mimic_sparse", "preference"):
            if stage in results:
                continue
            extra = quick_data(stage == "preference") if quick else []
            if mimic_lm_weight is not None and stage.startswith("mimic"):
                extra.append(f"--model.init_args.mimic.lm_weight={mimic_lm_weight}")
            results[stage] = fit_and_test(stage, CONFIGS / f"{stage}.yaml", overrides + extra)
        if quick:
            overrides = overrides + quick_data(False)
        # equal student steps: as many as the distilled student took (also under --quick's overrides)
        steps = results["mimic_dense"].steps
        instruct = baseline_config(CONFIGS / "mimic_dense.yaml", out / "configs" / "baseline_instruct.yaml",
                                   "baseline_instruct", "instruct", steps, None)
        results["baseline_instruct"] = fit_and_test("baseline_instruct", instruct,
                                                    overrides + [f"--trainer.max_steps={steps}"])
        steps = results["mimic_sparse"].steps + results["preference"].steps
        moe = baseline_config(CONFIGS / "mimic_sparse.yaml", out / "configs" / "baseline_moe.yaml", "baseline_moe",
                              "moe", steps, "runs/mod/baseline_instruct/model")
        results["baseline_moe"] = fit_and_test("baseline_moe", moe, overrides + [f"--trainer.max_steps={steps}"])
    summary = {
        "command": "python -m lightning_moe.experiments.distill --out DIR" + (" --quick" if quick else "")
        + (f" --mimic-lm-weight {mimic_lm_weight}" if mimic_lm_weight is not None else "")
        + (f" --teacher-from {teacher_from}" if teacher_from is not None else ""),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": quick,
        "torch_threads": torch.get_num_threads(),
        "wall_s": time.perf_counter() - start,
        "runs": [asdict(r) for r in results.values()],
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    (out / "results.md").write_text(results_markdown(summary))
    return summary


def _cell(value: float | None, fmt: str = "{:.3f}") -> str:
    return "" if value is None else fmt.format(value)


ROW_NAMES = {
    "teacher": "teacher (dense, 4 layers)",
    "mimic_dense": "student after mimic_dense",
    "mimic_sparse": "student after mimic_sparse",
    "preference": "**distilled student** (after preference)",
    "baseline_instruct": "undistilled student, instruct",
    "baseline_moe": "**undistilled student** (instruct + moe)",
}


def results_markdown(summary: dict) -> str:
    runs = {r["name"]: r for r in summary["runs"]}
    header = ["model", *DOMAINS, "mean", "POPE acc", "POPE F1", "yes-ratio", "activated params", "total params"]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for name, run in runs.items():
        m = run["metrics"]
        cells = [_cell(m.get(f"test/{d}/exact_match")) for d in DOMAINS] + [_cell(m.get("test/exact_match"))]
        cells += [_cell(m.get(f"test/pope/pope_{k}")) for k in ("accuracy", "f1", "yes_ratio")]
        cells += [f"{run['params_activated']:,}", f"{run['params_total']:,}"]
        lines.append(f"| {ROW_NAMES.get(name, name)} | " + " | ".join(cells) + " |")
    stage_lines = ["| run | method | stage | steps | median step (s) | peak memory (MB) | memory measured as | wall (s) |",
                   "|---|---|---|---:|---:|---:|---|---:|"]
    for name, run in runs.items():
        stage_lines.append(f"| {name} | {run['method']} | {run['stage']} | {run['steps']} | {_cell(run['step_time_s'])} | "
                           f"{_cell(run['peak_memory_mb'], '{:.0f}')} | {run['memory_kind']} | {run['wall_s']:.0f} |")
    verdict = []
    distilled, undistilled = runs.get("preference"), runs.get("baseline_moe")
    if distilled and undistilled:
        d, u = distilled["metrics"].get("test/exact_match"), undistilled["metrics"].get("test/exact_match")
        if d is not None and u is not None:
            word = "beats" if d > u else "does not beat"
            verdict.append(f"- Mean test exact match: distilled sparse student {d:.3f}, undistilled {u:.3f} "
                           f"(equal student steps): the distilled student {word} the undistilled one.")
    before, after = runs.get("mimic_sparse"), runs.get("preference")
    if before and after:
        b, a = before["metrics"], after["metrics"]
        if "test/pope/pope_f1" in b and "test/pope/pope_f1" in a:
            verdict.append(f"- Preference distillation, POPE F1 {b['test/pope/pope_f1']:.3f} -> {a['test/pope/pope_f1']:.3f}, "
                           f"yes-ratio {b['test/pope/pope_yes_ratio']:.3f} -> {a['test/pope/pope_yes_ratio']:.3f}, "
                           f"accuracy {b['test/pope/pope_accuracy']:.3f} -> {a['test/pope/pope_accuracy']:.3f}.")
    return "\n".join([
        f"# LLaVA-MoD distillation ({summary['date']}, `{summary['command']}`, torch threads "
        f"{summary['torch_threads']}, {summary['wall_s'] / 60:.1f} min)",
        "",
        "Test split, exact match per domain (greedy generation), mean over domains, POPE metrics on `pope`.",
        "",
        *lines,
        "",
        *verdict,
        "",
        "Per run: training steps, median step time, peak memory (CPU: peak resident set of the whole process).",
        "",
        *stage_lines,
        "",
    ])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory (results, runs, TensorBoard logs)")
    parser.add_argument("--quick", action="store_true", help="smoke version: a few steps and samples")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (on a shared, oversubscribed CPU 1 can be several times faster)")
    parser.add_argument("--mimic-lm-weight", type=float, default=None,
                        help="add the student's own LM loss with this weight in the mimic stages (kd_lm)")
    parser.add_argument("--teacher-from", type=Path, default=None,
                        help="reuse the teacher of an earlier output directory of this experiment")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    summary = run(args.out, args.quick, args.mimic_lm_weight, args.teacher_from)
    print((args.out / "results.md").read_text())
    return summary


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

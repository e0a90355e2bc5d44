"""Experiments: one file per question a paper asks, run through the CLI's classes
(`python -m lightning_moe.experiments.<name> --out DIR [--quick] [--seeds ...] [--threads N] [--reuse DIR]`).

What every experiment shares lives here, once:
- `experiment_parser`: the one command line (the core flags above; each experiment adds its own);
- `Run` (what a run is: a name, a row label, the CLI arguments) and `RunResult` (what it measured),
  and `execute(run, out)`: one CLI `fit` (then `test` with the same trainer, model and data module),
  quietly, with everything the run prints (Lightning's set-up lines, warnings, tables) in
  `OUT/logs/<run>.log` so that the console keeps one progress bar over the runs and the final table;
- `write_results`: `results.json` with the environment the numbers came from (torch threads, library
  versions, git commit) and `results.md`;
- `working_directory`: run inside the output directory (the configs' relative `runs/...` outputs land there).
Configs are named through `lightning_moe.paths.shipped_path`, so the experiments also run from an
installed wheel, without a checkout.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..callbacks import StageProfile
from ..cli import main as cli_main
from ..models import parameter_counts
from ..paths import REPO_ROOT

# Lightning's loggers carry their own console handlers (set up at import, bound to the console
# stream of that moment), so redirecting sys.stdout/sys.stderr alone does not quieten them
LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")
LIBRARIES = ("torch", "lightning", "transformers", "tokenizers", "torchmetrics", "jsonargparse", "numpy", "lightning-moe")


def experiment_parser(description: str, reuse: str | None = None) -> argparse.ArgumentParser:
    """The core flags every experiment accepts: --out, --quick, --seeds, --threads, and --reuse where an
    experiment can reuse an earlier output directory (`reuse` says what it reuses; None: no --reuse)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", required=True, type=Path, help="output directory (results.json, results.md, logs/, "
                        "the runs' TensorBoard logs and models)")
    parser.add_argument("--quick", action="store_true", help="the smoke version: a few steps on a few samples")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="seeds of the runs; several: the runs repeat per seed, each seed in OUT/seed<N>/")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (results can depend on it; on a machine shared with other jobs, "
                        "1 avoids oversubscription); recorded in results.json")
    if reuse:
        parser.add_argument("--reuse", type=Path, default=None, metavar="DIR", help=reuse)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, check the seeds and apply --threads (before any run)."""
    args = parser.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds has repeated seeds: {args.seeds}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    return args


def seed_directory(out: Path, seed: int, seeds: list[int]) -> Path:
    """Where one seed's runs go: OUT itself for a single seed, OUT/seed<N>/ for several."""
    return out if len(seeds) == 1 else out / f"seed{seed}"


@contextmanager
def working_directory(path: Path) -> Iterator[None]:
    """Run inside `path` (the configs' relative `runs/...` outputs land there; `contextlib.chdir` is
    Python 3.11+)."""
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


@contextmanager
def quiet(log_file: Path) -> Iterator[None]:
    """Everything a run prints goes to `log_file`: stdout, stderr, warnings and Lightning's log lines.
    Also hides the experiment's own argv from LightningCLI, which warns when it gets both argv and `args`."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    argv = sys.argv
    loggers = [logging.getLogger(name) for name in LIGHTNING_LOGGERS]
    saved = [(logger.handlers, logger.propagate) for logger in loggers]
    with open(log_file, "a") as stream, redirect_stdout(stream), redirect_stderr(stream), \
            warnings.catch_warnings():
        handler = logging.StreamHandler(stream)
        for logger in loggers:
            logger.handlers, logger.propagate = [handler], False
        # every warning in the log, once per place it comes from (the default), none on the console
        warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: stream.write(
            warnings.formatwarning(message, category, filename, lineno, line))
        sys.argv = argv[:1]
        try:
            yield
        finally:
            sys.argv = argv
            for logger, (handlers, propagate) in zip(loggers, saved):
                logger.handlers, logger.propagate = handlers, propagate


@dataclass
class Run:
    """One run of an experiment: its name (logs, TensorBoard, table rows), a label for the table, and the
    arguments of `lightning_moe.cli.main` after the subcommand (config files and overrides)."""

    name: str
    args: list[str]
    label: str = ""
    test: bool = True  # then `trainer.test` with the same trainer, model and data module
    seed: int | None = None  # recorded with the result (the seed itself is in `args`)


@dataclass
class RunResult:
    """One trained (and tested) run: what it was, what it cost, what it scored."""

    name: str
    method: str  # the LightningModule's class name
    stage: str  # its stage ("" for methods without stages)
    steps: int  # optimizer steps taken
    wall_s: float  # fit + test, data setup included
    step_time_s: float | None  # median training step after warm-up (StageProfile; None without it)
    peak_memory_mb: float | None
    memory_kind: str  # cpu_peak_rss (whole process) | cuda_max_allocated
    params_total: int
    params_activated: int  # parameters one token uses (top-k of E experts count k/E)
    metrics: dict[str, float] = field(default_factory=dict)  # test/<domain>/<metric>, test/exact_match
    params_trainable: int | None = None  # None in rows written before this field existed
    label: str = ""  # the row's name in a table
    seed: int | None = None
    details: dict[str, Any] = field(default_factory=dict)  # what one experiment measures beyond these

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> RunResult:
        """A row of a results.json (unknown keys, e.g. from an older layout, are dropped)."""
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in row.items() if k in known})


def execute(run: Run, out: Path, inspect: Any = None) -> RunResult:
    """`lightning_moe.cli.main(["fit", *run.args])`, then `test` (when `run.test`), quietly: the run's
    output goes to OUT/logs/<name>.log. `inspect(cli)`, if given, returns the run's `details` from the
    finished CLI (its model, trainer and data module). A `StageProfile` callback gives step time and memory."""
    start = time.perf_counter()
    with quiet(Path(out) / "logs" / f"{run.name}{'' if run.seed is None else f'_seed{run.seed}'}.log"):
        cli = cli_main(["fit", *run.args])
        if run.test:
            cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
        details = inspect(cli) if inspect else {}
    profile = next((cb for cb in cli.trainer.callbacks if isinstance(cb, StageProfile)), StageProfile())
    counts = parameter_counts(cli.model.model)
    result = RunResult(
        name=run.name, method=type(cli.model).__name__, stage=str(getattr(cli.model, "stage", "") or ""),
        steps=cli.trainer.global_step, wall_s=time.perf_counter() - start, step_time_s=profile.step_time_s,
        peak_memory_mb=profile.peak_memory_mb, memory_kind=profile.memory_kind, params_total=counts.total,
        params_activated=counts.activated,
        metrics={k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith(("test/", "val/"))},
        params_trainable=sum(p.numel() for p in cli.model.parameters() if p.requires_grad),
        label=run.label or run.name, seed=run.seed, details=details,
    )
    del cli
    gc.collect()  # the next run's peak memory should not hold this one's model
    return result


def git_commit() -> str | None:
    """The checkout's commit (with `+dirty` when files differ from it); None outside a git checkout
    (an installed wheel)."""
    if not (REPO_ROOT / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):  # no git program, or not a repository after all
        return None
    return commit + ("+dirty" if dirty else "")


def environment(command: str) -> dict[str, Any]:
    """What the numbers depend on besides the code's arguments: torch threads (results differ between
    1 and 2), library versions, the git commit; and the date and the command."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "command": command,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "torch_threads": torch.get_num_threads(),
        "versions": {"python": sys.version.split()[0], **versions},
        "git_commit": git_commit(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }


def command_line(module: str, argv: list[str] | None) -> str:
    """How this experiment was started: `python -m <module> <arguments>`."""
    return " ".join(["python -m", module, *(sys.argv[1:] if argv is None else argv)])


def progress(runs: list[Any] | int, desc: str) -> tqdm:
    """The one progress bar over an experiment's runs (on the console: the runs' own output goes to logs):
    over a list of runs, or a bar of `runs` steps to advance with `.update()`."""
    if isinstance(runs, int):
        return tqdm(total=runs, desc=desc, unit="run", file=sys.stderr, dynamic_ncols=True)
    return tqdm(runs, desc=desc, unit="run", file=sys.stderr, dynamic_ncols=True)


def write_results(out: Path, summary: dict[str, Any], markdown: str, command: str) -> dict[str, Any]:
    """OUT/results.json (the summary with `environment`) and OUT/results.md; returns the summary written."""
    summary = {**summary, "environment": summary.get("environment") or environment(command)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    env = summary["environment"]
    footer = (f"\n_{env['date']}, torch {env['versions']['torch']} with {env['torch_threads']} threads, "
              f"commit {env['git_commit'] or 'unknown (not a git checkout)'}._\n")
    (out / "results.md").write_text(markdown.rstrip("\n") + "\n" + footer)
    return summary


def run_seeds(out: Path, seeds: list[int], one_seed: Callable[[Path, int], tuple[dict[str, Any], str]],
              command: str) -> dict[str, Any]:
    """`one_seed(workdir, seed) -> (summary, markdown table)` for every seed, in `seed_directory`; writes the
    results (one seed: OUT/results.*; several: each seed's in OUT/seed<N>/ and all of them in OUT/results.*),
    prints the table and returns what results.json holds."""
    summaries, tables = {}, []
    for seed in seeds:
        workdir = seed_directory(out, seed, seeds)
        summary, table = one_seed(workdir, seed)
        if len(seeds) > 1:
            write_results(workdir, summary, table, command)
        summaries[seed], tables = summary, [*tables, f"## Seed {seed}\n\n{table}"]
    if len(seeds) == 1:
        written = write_results(out, summaries[seeds[0]], table, command)
    else:
        written = write_results(out, {"seeds": seeds, "per_seed": {str(s): v for s, v in summaries.items()}},
                                "\n\n".join(tables), command)
    print((out / "results.md").read_text())
    return written

"""Experiments: one file per question a paper asks, run through the CLI's classes
(`python -m lightning_moe.experiments.<name> --out DIR [--quick] [--seeds ...] [--jobs N] [--threads N]
[--reuse DIR]`).

What every experiment shares lives here, once:
- `experiment_parser`: the one command line (the core flags above; each experiment adds its own);
- `Run` (what a run is: a name, a row label, the CLI arguments) and `RunResult` (what it measured),
  and `execute(run, out)`: one CLI `fit` (then `test` with the same trainer, model and data module),
  quietly, with everything the run prints (Lightning's set-up lines, warnings, tables) in
  `OUT/logs/<run>.log` so that the console keeps one progress bar over the runs and the final table;
- `run_seeds` / `map_seeds`: the seeds, each in its own process (`--jobs` at a time, `--threads` torch
  threads each), their results collected; `map_seeds_until`: a selection's seeds in rounds, stopped once one
  fails what every seed must meet;
- `environment` (read when a run starts: the command, torch threads, library versions, the git commit and
  whether the tree had uncommitted changes) and `write_results`: `results.json` with that environment and
  `results.md`, whose footer names the commit (and a dirty tree);
- `working_directory`: run inside the output directory (the configs' relative `runs/...` outputs land there);
- `write_run_config` (with `validation_schedule` and `save_pretrained_callback`): a run's overrides on top of a
  shipped config, written to OUT/configs/<run>.yaml.
Configs are named through `lightning_moe.paths.shipped_path`, so the experiments also run from an
installed wheel, without a checkout.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import logging
import os
import sys
import time
import warnings
import multiprocessing
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm import tqdm

from ..callbacks import StageProfile
from ..cli import main as cli_main
from ..data.records import parse_record, read_llava_records
from ..metrics import majority_answer_score
from ..models import parameter_counts
from .protocol import DEFAULT_SEEDS, Protocol
from ..provenance import git_state, provenance_words

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
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help=f"seeds of the runs (default {' '.join(map(str, DEFAULT_SEEDS))}; with --quick 0); "
                        "several: the runs repeat per seed, each seed in OUT/seed<N>/")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads of each seed's process (results can depend on it; default 1 when "
                        "seeds run in parallel); recorded in results.json")
    parser.add_argument("--jobs", type=int, default=None,
                        help="seeds run at the same time, each in its own process (default: one per CPU core, "
                        "at most one per seed; 1: one after another in this process)")
    if reuse:
        parser.add_argument("--reuse", type=Path, default=None, metavar="DIR", help=reuse)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, fill in the default seeds (the protocol's; one with --quick), check them and apply --threads
    (before any run)."""
    args = parser.parse_args(argv)
    if args.seeds is None:
        args.seeds = [0] if args.quick else list(DEFAULT_SEEDS)
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds has repeated seeds: {args.seeds}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if args.jobs is None:  # as many seed processes as the cores hold at the threads asked for
        args.jobs = max(1, min(len(args.seeds), available_cores() // (args.threads or 1)))
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.threads is None and args.jobs > 1:
        args.threads = 1  # one core per seed's process
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    oversubscription = oversubscription_warning(args.jobs, args.threads or torch.get_num_threads(), available_cores())
    if oversubscription:
        print(oversubscription, file=sys.stderr, flush=True)
    return args


def available_cores() -> int:
    """The cores this process may run on (its affinity where the platform says, else every core)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def seed_process_environment(jobs: int, threads: int, cores: int,
                             environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """What the seed processes' environment gains: `OMP_WAIT_POLICY=PASSIVE` when `jobs` processes of `threads`
    torch threads ask for more than `cores` and the caller chose no policy. Without a policy, a thread that
    reaches the end of a parallel region spins for a while before it sleeps, waiting for its team; two
    multi-threaded processes sharing the cores then spend each other's time slices spinning
    (`benchmarks/seed_processes.py`, docs/experiments.md). A passive thread sleeps at once. The policy decides how
    a thread waits, not how the work is split among the threads: the benchmark finds the trained weights bit for
    bit those of the seeds run one at a time."""
    if jobs <= 1 or threads <= 1 or jobs * threads <= cores or "OMP_WAIT_POLICY" in environ:
        return {}
    return {"OMP_WAIT_POLICY": "PASSIVE"}


def oversubscription_warning(jobs: int, threads: int, cores: int,
                             environ: Mapping[str, str] = os.environ) -> str | None:
    """What to say when `jobs` seed processes of `threads` torch threads each ask for more than `cores` and
    waiting passively (`seed_process_environment`) is not known to make up for it: one process's team is larger
    than the cores, the threads ask for more than twice the cores (the benchmark measured twice), or the
    caller's OMP_WAIT_POLICY keeps the threads spinning. Each parallel region waits for every thread of its team,
    and a descheduled thread holds its team up for a time slice. None: it fits, or the seed processes wait
    passively on at most twice the cores."""
    if threads <= 1 or jobs * threads <= cores:
        return None
    policy = environ.get("OMP_WAIT_POLICY")
    passive = policy is None or policy.lower() == "passive"
    if jobs > 1 and threads <= cores and jobs * threads <= 2 * cores and passive:
        return None
    fitting = min(threads, cores)
    reason = ("each process has more threads than the cores" if threads > cores else
              f"OMP_WAIT_POLICY={policy} keeps waiting threads spinning on cores the other processes need"
              if not passive else "more than twice the cores")
    return (f"warning: --jobs {jobs} x --threads {threads} = {jobs * threads} torch threads on {cores} cores: "
            f"{reason}, and runs slow down several times over; use --jobs {max(1, cores // fitting)} with "
            f"--threads {fitting}" + (" or unset OMP_WAIT_POLICY" if threads <= cores and not passive else ""))


def _seed_worker_start(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


def map_seeds(one_seed: Callable[[int], Any], seeds: list[int], jobs: int = 1,
              threads: int | None = None) -> dict[int, Any]:
    """seed -> `one_seed(seed)` for every seed: one after another in this process (`jobs` 1), else in `jobs`
    fresh processes at a time (spawned: torch's thread pools do not survive a fork), each with `threads` torch
    threads. `one_seed` must then be picklable: a module-level function, or a `functools.partial` of one."""
    if jobs <= 1 or len(seeds) <= 1:
        return {seed: one_seed(seed) for seed in seeds}
    workers = min(jobs, len(seeds))
    # threads None: a spawned torch's default, one per core
    wait_policy = seed_process_environment(workers, threads or available_cores(), available_cores())
    with environment_variables(wait_policy), ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context("spawn"), initializer=_seed_worker_start,
            initargs=(threads,)) as pool:
        futures = {seed: pool.submit(one_seed, seed) for seed in seeds}
        return {seed: future.result() for seed, future in futures.items()}


@contextmanager
def environment_variables(values: dict[str, str]) -> Iterator[None]:
    """`values` in os.environ while inside (what a process spawned there inherits), the previous values after."""
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def map_seeds_until(one_seed: Callable[[int], Any], seeds: list[int], failed: Callable[[dict[int, Any]], bool],
                    jobs: int = 1, threads: int | None = None) -> dict[int, Any]:
    """`map_seeds` in rounds of `jobs` seeds, stopping after the round whose results so far `failed` says settle
    the question: a selection rule that every seed must meet, broken by one of them, rejects its rung whatever
    the seeds not yet run would show, so a rejected rung costs only the rounds up to that seed."""
    results: dict[int, Any] = {}
    per_round = max(1, jobs)
    for first in range(0, len(seeds), per_round):
        results |= map_seeds(one_seed, seeds[first:first + per_round], jobs, threads)
        if len(results) < len(seeds) and failed(results):
            break
    return results


def not_run(seeds: list[int], measured: Iterable[str]) -> list[str]:
    """The reason a rung `map_seeds_until` stopped early lists beside the failures it saw (none when every seed
    ran)."""
    done = {str(seed) for seed in measured}
    missing = [str(seed) for seed in seeds if str(seed) not in done]
    return [f"seed {', '.join(missing)} not run (a seed had already failed what every seed must meet)"] if missing \
        else []


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


def validation_schedule(steps: int, validations: int) -> dict[str, Any]:
    """The trainer keys that validate on val `validations` times over `steps` steps (the last at the end); 0:
    never."""
    if not validations:
        return {"limit_val_batches": 0}
    return {"limit_val_batches": 1.0, "val_check_interval": max(1, steps // validations),
            "check_val_every_n_epoch": None}


def save_pretrained_callback(directory: Path) -> dict[str, Any]:
    """The callback that saves the trained model (`save_pretrained`) into `directory`, as a config names it."""
    return {"class_path": "lightning_moe.callbacks.SavePretrained", "init_args": {"dirpath": str(directory)}}


def write_run_config(out: Path, name: str, seed: int, steps: int, validation: dict[str, Any], model: dict[str, Any],
                     data: dict[str, Any], callbacks: list[dict[str, Any]]) -> Path:
    """A run's overrides on top of a shipped config (merged key by key into it), written to OUT/configs/<name>.yaml
    where a reader can rerun them: `steps` quiet steps (no checkpoints, progress bar or summary), `validation`'s
    trainer keys (`validation_schedule`), TensorBoard under OUT/tensorboard/<name>, a `StageProfile` (step time
    and memory) before `callbacks`, the model's `init_args` and the data module's config."""
    config = {
        "seed_everything": seed,
        "trainer": {
            "max_steps": steps, **validation, "num_sanity_val_steps": 0, "enable_checkpointing": False,
            "enable_progress_bar": False, "enable_model_summary": False, "log_every_n_steps": max(1, min(20, steps)),
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": str(out / "tensorboard"), "name": name, "version": ""}},
            "callbacks": [{"class_path": "lightning_moe.callbacks.StageProfile", "init_args": {"warmup_steps": 5}},
                          *callbacks],
        },
        "model": {"init_args": model},
        "data": data,
    }
    path = out / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


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
        # the learning curves: val/exact_match (mean over domains) and val/<domain>/exact_match, per validation
        details.setdefault("val_curves", logged_scalars(cli, prefix="val/", suffix="exact_match"))
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


def answers(root: Path, domain: str, split: str = "test", samples: int | None = None) -> list[str]:
    """The answer (last assistant turn) of each record of ROOT/<domain>/<split>.jsonl (its first `samples`
    records; None: all)."""
    path = root / domain / f"{split}.jsonl"
    records = read_llava_records(path)[:samples]
    return [[m.content for m in parse_record(r, root, path, i + 1).messages if m.role == "assistant"][-1]
            for i, r in enumerate(records)]


def majority_answers(root: Path, domains: list[str] | tuple[str, ...], split: str = "test",
                     samples: int | None = None) -> dict[str, float]:
    """Domain -> exact match of always giving the most frequent answer of ROOT/<domain>/<split>.jsonl (its first
    `samples` records; None: all): the chance level the gates compare an arm with."""
    return {domain: majority_answer_score(answers(root, domain, split, samples)) for domain in domains}


def final_val(result: RunResult | dict[str, Any], domains: list[str]) -> dict[str, float] | None:
    """Domain -> val exact match at the end of a run (its learning curve's last point, logged while training: a
    run tested after training holds only the test metrics); None when a domain's curve is missing (a run without
    validation)."""
    curves = (result.details if isinstance(result, RunResult) else result["details"]).get("val_curves", {})
    points = {d: curves.get(f"val/{d}/exact_match") for d in domains}
    return None if not all(points.values()) else {d: p[-1][1] for d, p in points.items()}


def val_at(result: RunResult, domain: str, step: int) -> float | None:
    """`domain`'s val exact match at the last validation made after at most `step` training steps (a point of its
    learning curve); None when there was none by then. Lightning logs the validation made after step s at step
    s - 1 (the optimizer-step counter moves on after it)."""
    points = [value for logged, value in result.details.get("val_curves", {}).get(f"val/{domain}/exact_match", [])
              if logged + 1 <= step]
    return points[-1] if points else None


def logged_scalars(cli: Any, *tags: str, prefix: str | None = None, suffix: str = "") -> dict[str, list[list[float]]]:
    """tag -> [(step, value)] of the scalars a finished CLI's TensorBoard logger wrote: the `tags` named, and
    every tag with `prefix` (and `suffix`). {} without a TensorBoard logger."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = cli.trainer.logger
    if logger is None or not getattr(logger, "log_dir", None) or not hasattr(logger.experiment, "flush"):
        return {}
    logger.experiment.flush()
    events = EventAccumulator(str(logger.log_dir), size_guidance={"scalars": 0})
    events.Reload()
    wanted = [t for t in events.Tags()["scalars"]
              if t in tags or (prefix is not None and t.startswith(prefix) and t.endswith(suffix))]
    return {tag: [[e.step, e.value] for e in events.Scalars(tag)] for tag in wanted}


def environment(command: str) -> dict[str, Any]:
    """What the numbers depend on besides the code's arguments: torch threads (results differ between
    1 and 2), library versions, the git commit and whether the tree was dirty; and the date and the command.
    Read when a run starts (`run_seeds`), so that a commit made during a long run is not credited with it."""
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
        **git_state(),
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
              f"{provenance_words(env)}._\n")
    (out / "results.md").write_text(markdown.rstrip("\n") + "\n" + footer)
    return summary


SEED_RESULT = "seed_result.json"  # in a seed's directory: what it returned, with the resume key it was made under


def resume_key(env: dict[str, Any], threads: int | None) -> dict[str, Any] | None:
    """What a finished seed's result depends on besides its seed: the commit, the command without the seed list
    and the number of processes (`--seeds`, `--jobs`), and the torch threads of a seed process. None on a tree with
    uncommitted changes or outside a git checkout: the code is then unknown, so nothing is reused."""
    if env.get("git_dirty") or not env.get("git_commit"):
        return None
    words, kept, skip = env["command"].split(), [], False
    for word in words:
        if word in ("--seeds", "--jobs"):
            skip = True
            continue
        if skip and not word.startswith("--"):
            continue
        skip = False
        kept.append(word)
    return {"git_commit": env["git_commit"], "command": " ".join(kept), "threads": threads}


def kept(saved: Path, key: dict[str, Any] | None, make: Callable[[], Any], what: str) -> Any:
    """`make()` (JSON-able), kept in `saved` as soon as it is made, and taken from there instead when a run under
    the same `resume_key` made it (None, on a dirty tree: neither kept nor taken): what lets an interrupted
    experiment, started again with the same command on the same commit, redo only what had not finished. `what`
    names it on stderr when it is taken."""
    if key is not None and saved.is_file():
        stored = json.loads(saved.read_text())
        if stored.get("key") == key:
            print(f"{what}: from {saved} (made by this command on this commit)", file=sys.stderr)
            return stored["value"]
    value = make()
    if key is not None:  # written whole or not at all: a run killed while writing leaves no half file to trip on
        saved.parent.mkdir(parents=True, exist_ok=True)
        partial = saved.with_name(saved.name + ".partial")
        partial.write_text(json.dumps({"key": key, "value": value}))
        os.replace(partial, saved)
    return value


def _one_seed_in(out: Path, seeds: list[int], one_seed: Callable[[Path, int], tuple[dict[str, Any], str]],
                 key: dict[str, Any] | None, seed: int) -> tuple[dict[str, Any], str]:
    """`one_seed` in the seed's directory, its result `kept` there (SEED_RESULT): an interrupted experiment reruns
    only the seeds that had not finished."""
    directory = seed_directory(out, seed, seeds)
    directory.mkdir(parents=True, exist_ok=True)  # the seed's runs start inside it (distill's teacher, first)
    summary, table = kept(directory / SEED_RESULT, key, lambda: list(one_seed(directory, seed)),
                          f"seed {seed}: its result")
    return summary, table


def map_kept_seeds(out: Path, seeds: list[int], one_seed: Callable[[Path, int], tuple[dict[str, Any], str]],
                   key: dict[str, Any] | None, jobs: int = 1,
                   threads: int | None = None) -> dict[int, tuple[dict[str, Any], str]]:
    """seed -> `one_seed(seed_directory, seed)` (`map_seeds`), each seed's result kept in its directory as soon as
    it is made and taken from there by a later run under the same `key` (`resume_key`; None, on a dirty tree:
    neither kept nor taken): what lets an interrupted experiment rerun only its unfinished seeds."""
    return map_seeds(functools.partial(_one_seed_in, out, seeds, one_seed, key), seeds, jobs, threads)


def run_seeds(out: Path, seeds: list[int], one_seed: Callable[[Path, int], tuple[dict[str, Any], str]],
              command: str, protocol: Protocol | None = None,
              combine: Callable[[dict[int, dict[str, Any]]], tuple[dict[str, Any], str]] | None = None,
              jobs: int = 1, threads: int | None = None, env: dict[str, Any] | None = None) -> dict[str, Any]:
    """`one_seed(workdir, seed) -> (summary, markdown table)` for every seed, in `seed_directory`, `jobs` seeds
    at a time in processes of their own (`map_seeds`; `one_seed` picklable then); writes the results (one
    seed: OUT/results.*; several: each seed's in OUT/seed<N>/ and all of them in OUT/results.*), prints the
    table and returns what results.json holds (`per_seed_summaries` reads the seeds back). `protocol` heads
    results.json and results.md; `combine(per-seed summaries) -> (summary over seeds, its markdown)` adds the
    tables and verdicts over the seeds (also for one seed, so that every results file has the same layout).
    `env` (default: read now, before the first run) is the environment every file written records. A seed
    finished by an earlier run of the same command on the same clean commit is not run again (`_one_seed_in`);
    every seed's summary goes through JSON before `combine`, so a reused one and a fresh one look the same."""
    env = env or environment(command)
    key = resume_key(env, threads)
    results = map_kept_seeds(out, seeds, one_seed, key, jobs, threads)
    summaries, tables = {}, []
    for seed in seeds:
        summary, table = results[seed]
        summary = {**json.loads(json.dumps(summary)), "environment": env}
        if len(seeds) > 1:
            write_results(seed_directory(out, seed, seeds), summary, table, command)
        summaries[seed], tables = summary, [*tables, f"## Seed {seed}\n\n{table}"]
    head = [protocol.markdown()] if protocol else []
    combined, combined_md = combine(summaries) if combine else ({}, "")
    extra = {**({"protocol": protocol.as_dict()} if protocol else {}), **combined, "environment": env}
    if len(seeds) == 1:
        markdown = "\n\n".join([*head, *([combined_md] if combined_md else []), table])
        written = write_results(out, {**summaries[seeds[0]], **extra, "seeds": seeds}, markdown, command)
    else:
        written = write_results(out, {**extra, "seeds": seeds, "per_seed": {str(s): v for s, v in summaries.items()}},
                                "\n\n".join([*head, *([combined_md] if combined_md else []), *tables]), command)
    print((out / "results.md").read_text())
    return written


def per_seed_summaries(results: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """seed -> that seed's summary, from a results.json that `run_seeds` wrote (one seed or several)."""
    if results.get("per_seed"):
        return {int(seed): summary for seed, summary in results["per_seed"].items()}
    seeds = results.get("seeds") or [results.get("seed", 0)]
    return {int(seeds[0]): results}

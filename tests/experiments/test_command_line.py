"""Every experiment takes the same core flags through one shared parser, records what its numbers depend
on, and finds its configs through the package (a checkout or an installed wheel)."""

from __future__ import annotations

import ast
import functools
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_moe import paths
from lightning_moe.experiments import (RunResult, environment, map_seeds, parse_args, quiet, resume_key, run_seeds,
                                      seed_directory)
from lightning_moe.provenance import git_state, provenance_words
from tests.conftest import ROOT

EXPERIMENTS = ["conflict", "continual", "distill", "moe_llava"]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_accepts_the_core_flags(name, tmp_path):
    module = importlib.import_module(f"lightning_moe.experiments.{name}")
    threads = torch.get_num_threads()
    try:
        args = parse_args(module.build_parser(), ["--threads", "1", "--quick", "--seeds", "0", "--out", str(tmp_path)])
        assert torch.get_num_threads() == 1  # applied before any run
    finally:
        torch.set_num_threads(threads)
    assert (args.threads, args.quick, args.seeds, args.out) == (1, True, [0], tmp_path)
    several = module.build_parser().parse_args(["--out", "x", "--seeds", "0", "1", "2"])
    assert several.seeds == [0, 1, 2] and several.threads is None and not several.quick


@pytest.mark.parametrize("name", ["conflict", "distill"])
def test_reuse_where_it_applies(name):
    module = importlib.import_module(f"lightning_moe.experiments.{name}")
    assert module.build_parser().parse_args(["--out", "x", "--reuse", "earlier"]).reuse == Path("earlier")


def test_repeated_seeds_and_zero_threads_are_refused(capsys):
    from lightning_moe.experiments import conflict

    for argv, message in ((["--out", "x", "--seeds", "1", "1"], "repeated seeds"), (["--out", "x", "--threads", "0"],
                                                                                      "at least 1")):
        with pytest.raises(SystemExit):
            parse_args(conflict.build_parser(), argv)
        assert message in capsys.readouterr().err


def test_oversubscribed_threads_are_warned_about(capsys, monkeypatch):
    from lightning_moe import experiments
    from lightning_moe.experiments import conflict

    warning = experiments.oversubscription_warning
    assert warning(jobs=2, threads=1, cores=2, environ={}) is None  # one thread per process
    assert warning(jobs=1, threads=2, cores=2, environ={}) is None
    # seed processes sharing the cores wait passively (seed_process_environment): nothing to warn about
    assert warning(jobs=2, threads=2, cores=2, environ={}) is None
    assert warning(jobs=2, threads=2, cores=2, environ={"OMP_WAIT_POLICY": "passive"}) is None
    message = warning(jobs=2, threads=2, cores=2, environ={"OMP_WAIT_POLICY": "ACTIVE"})  # the caller's spinning
    assert "--jobs 2 x --threads 2 = 4 torch threads on 2 cores" in message and "OMP_WAIT_POLICY=ACTIVE" in message
    assert "use --jobs 1 with --threads 2 or unset OMP_WAIT_POLICY" in message
    # one process's team larger than the cores: waiting passively does not make up for it
    message = warning(jobs=1, threads=4, cores=2, environ={})
    assert "more threads than the cores" in message and "use --jobs 1 with --threads 2" in message
    assert "use --jobs 1 with --threads 2" in warning(jobs=2, threads=4, cores=2, environ={})
    # passive waits were measured at twice the cores, not beyond
    message = warning(jobs=3, threads=2, cores=2, environ={})
    assert "more than twice the cores" in message and "unset" not in message
    monkeypatch.setattr(experiments, "available_cores", lambda: 2)
    monkeypatch.setenv("OMP_WAIT_POLICY", "active")
    threads = torch.get_num_threads()
    try:
        parse_args(conflict.build_parser(), ["--out", "x", "--seeds", "0", "1", "--jobs", "2", "--threads", "2"])
        assert "use --jobs 1 with --threads 2" in capsys.readouterr().err
        monkeypatch.delenv("OMP_WAIT_POLICY")
        parse_args(conflict.build_parser(), ["--out", "x", "--seeds", "0", "1", "--jobs", "2", "--threads", "2"])
        assert "warning" not in capsys.readouterr().err
        parse_args(conflict.build_parser(), ["--out", "x", "--seeds", "0", "1", "--jobs", "1", "--threads", "2"])
        assert "warning" not in capsys.readouterr().err
        # without --jobs: as many seed processes as the cores hold at the threads asked for
        assert parse_args(conflict.build_parser(), ["--out", "x", "--seeds", "0", "1", "--threads", "2"]).jobs == 1
        assert parse_args(conflict.build_parser(), ["--out", "x", "--seeds", "0", "1", "2"]).jobs == 2
        assert "warning" not in capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)


def seed_process_state(seed: int) -> tuple[int, str | None]:
    """What a seed's process returns and sees: its seed's absolute value and its OMP_WAIT_POLICY."""
    return abs(seed), os.environ.get("OMP_WAIT_POLICY")


def test_seed_processes_sharing_the_cores_wait_passively(monkeypatch):
    """Seed processes with more torch threads together than the cores get OMP_WAIT_POLICY=PASSIVE (their threads
    sleep at the end of a parallel region instead of spinning on a core another process needs); a policy the
    caller set is theirs to keep."""
    from lightning_moe import experiments

    environment_for = experiments.seed_process_environment
    assert environment_for(jobs=2, threads=2, cores=2, environ={}) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert environment_for(jobs=2, threads=1, cores=2, environ={}) == {}  # one thread each: no team to wait for
    assert environment_for(jobs=2, threads=2, cores=4, environ={}) == {}  # it fits
    assert environment_for(jobs=1, threads=4, cores=2, environ={}) == {}  # no seed processes: this process's own
    assert environment_for(jobs=2, threads=2, cores=2, environ={"OMP_WAIT_POLICY": "ACTIVE"}) == {}
    # what the children see: test_seeds_run_in_parallel_processes_and_come_back_by_seed


def test_seed_directories():
    assert seed_directory(Path("out"), 3, [3]) == Path("out")
    assert seed_directory(Path("out"), 3, [0, 3]) == Path("out/seed3")


def test_environment_records_threads_versions_and_the_commit():
    env = environment("python -m lightning_moe.experiments.conflict --out x")
    assert env["torch_threads"] == torch.get_num_threads()
    assert env["versions"]["torch"] == torch.__version__.split("+")[0] or env["versions"]["torch"] == torch.__version__
    assert env["versions"]["lightning"] and env["command"].endswith("--out x")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert env["git_commit"].split("+")[0] == head == git_state()["git_commit"].split("+")[0]
    assert env["git_dirty"] == env["git_commit"].endswith("+dirty")
    # a run that started on a dirty tree says so wherever its commit is written
    assert provenance_words({"git_commit": "abc+dirty", "git_dirty": True}).startswith(
        "commit abc+dirty (started on a tree with uncommitted changes")
    assert provenance_words({"git_commit": "abc", "git_dirty": False}) == "commit abc"
    assert provenance_words({"git_commit": None}) == "commit unknown (not a git checkout)"


def test_seeds_run_in_parallel_processes_and_come_back_by_seed(monkeypatch):
    # two spawned processes of 2 threads on "2 cores": the results are collected per seed, whichever finishes
    # first; the children wait passively (seed_process_environment), the calling process's environment stays as it was
    from lightning_moe import experiments

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(experiments, "available_cores", lambda: 2)
    assert map_seeds(seed_process_state, [-2, -1], jobs=2, threads=2) == {-2: (2, "PASSIVE"), -1: (1, "PASSIVE")}
    assert "OMP_WAIT_POLICY" not in os.environ
    assert map_seeds(abs, [-3], jobs=4) == {-3: 3}  # one seed: in this process
    threads = torch.get_num_threads()
    try:
        args = parse_args(importlib.import_module("lightning_moe.experiments.conflict").build_parser(),
                          ["--out", "x", "--seeds", "0", "1", "--jobs", "2"])
    finally:
        torch.set_num_threads(threads)
    assert args.jobs == 2 and args.threads == 1  # parallel seeds: one thread each unless --threads says otherwise
    assert parse_args(importlib.import_module("lightning_moe.experiments.conflict").build_parser(),
                      ["--out", "x", "--quick"]).jobs == 1  # one seed, one process


def _counting_seed(calls: list[int], directory: Path, seed: int) -> tuple[dict, str]:
    assert directory.is_dir(), f"seed {seed} starts in {directory}, which does not exist"  # a run may chdir there first
    calls.append(seed)
    return {"score": {1: seed / 10}}, f"table {seed}"  # an int key: JSON makes it a string


def test_an_interrupted_experiment_reruns_only_its_unfinished_seeds(tmp_path):
    command = "python -m lightning_moe.experiments.conflict --out runs/x --seeds 0 1 2 --threads 1 --jobs 2"
    env = {"command": command, "git_commit": "abc", "git_dirty": False, "date": "d", "torch_threads": 1,
           "versions": {"torch": "t"}}
    seen: list[dict] = []

    def run(calls: list[int], env: dict, seeds=(0, 1, 2)) -> dict:
        return run_seeds(tmp_path, list(seeds), functools.partial(_counting_seed, calls), env["command"],
                         combine=lambda summaries: (seen.append(summaries) or {}, ""), env=env, threads=1)

    first: list[int] = []
    run(first, env)
    assert first == [0, 1, 2] and all((tmp_path / f"seed{s}" / "seed_result.json").is_file() for s in (0, 1, 2))
    (tmp_path / "seed1" / "seed_result.json").unlink()  # seed 1 had not finished when the run stopped
    again: list[int] = []
    written = run(again, {**env, "command": command.replace("--jobs 2", "--jobs 1"), "date": "later"})
    assert again == [1]  # the others come from their directories: same commit, same command but for --jobs
    # combine sees the same summaries, fresh or reused (JSON both times); the environment is the run's
    assert [{s: {k: v for k, v in summary.items() if k != "environment"} for s, summary in run_.items()}
            for run_ in seen[:2]] == [{s: {"score": {"1": s / 10}} for s in (0, 1, 2)}] * 2
    assert seen[1][0]["score"] == {"1": 0.0} and written["environment"]["date"] == "later"
    for changed in ({"git_commit": "abd"}, {"git_commit": "abc+dirty", "git_dirty": True},
                    {"command": command.replace("--threads 1", "--threads 2")}):
        calls: list[int] = []
        run(calls, {**env, **changed}, seeds=[0])
        assert calls == [0], changed  # another commit, a dirty tree, other threads: run again
    assert resume_key({**env, "command": command + " --quick"}, 1) != resume_key(env, 1)
    assert resume_key(env, 1) == resume_key({**env, "command": command.replace("--seeds 0 1 2", "--seeds 0")}, 1)
    assert resume_key(env, 1) != resume_key(env, 2)


def test_quiet_sends_warnings_logs_and_prints_to_the_run_log(tmp_path, capfd):
    import logging
    import warnings

    log = tmp_path / "logs" / "run.log"
    argv = sys.argv
    with quiet(log):
        print("a table")
        warnings.warn("a repeated warning")
        logging.getLogger("lightning.pytorch.utilities.rank_zero").info("GPU available: False")
        assert sys.argv == argv[:1]  # LightningCLI sees no foreign command line
    assert sys.argv == argv
    console = capfd.readouterr()
    assert "a table" not in console.out + console.err and "GPU available" not in console.out + console.err
    text = log.read_text()
    assert "a table" in text and "a repeated warning" in text and "GPU available: False" in text


def test_run_result_reads_rows_of_an_older_layout():
    row = {"name": "teacher", "method": "MoETuning", "stage": "instruct", "steps": 2, "wall_s": 1.0,
           "step_time_s": None, "peak_memory_mb": None, "memory_kind": "cpu_peak_rss", "params_total": 10,
           "params_activated": 10, "metrics": {}, "seed": None, "trainable_params": 3}  # a key no longer written
    assert RunResult.from_dict(row).params_total == 10


# ---------------------------------------------------------------- configs and data through the package
def test_shipped_paths_come_from_the_checkout_else_the_installed_copy(tmp_path, monkeypatch):
    assert paths.shipped_path("configs/mole/lora.yaml") == ROOT / "configs/mole/lora.yaml"
    # an installed wheel: no checkout around the package, the shipped copy beside it (setup.py puts it there)
    installed = tmp_path / "site-packages" / "lightning_moe" / "_shipped"
    (installed / "configs" / "mole").mkdir(parents=True)
    (installed / "configs" / "mole" / "lora.yaml").write_text("model: {}\n")
    (installed / "data" / "tokenizer").mkdir(parents=True)
    monkeypatch.setattr(paths, "REPO_ROOT", tmp_path / "site-packages")
    monkeypatch.setattr(paths, "SHIPPED_ROOT", installed)
    monkeypatch.chdir(tmp_path)
    assert paths.shipped_path("configs/mole/lora.yaml") == installed / "configs/mole/lora.yaml"
    assert paths.resolve_data_path("data/tokenizer") == installed / "data/tokenizer"
    with pytest.raises(FileNotFoundError, match="configs/mole/mole.yaml"):
        paths.shipped_path("configs/mole/mole.yaml")


def test_the_wheel_ships_what_the_experiments_name():
    # setup.py copies these into the wheel's lightning_moe/_shipped/ (MANIFEST.in into the sdist); every config
    # and data root the experiments and configs name lies under one of them
    tree = ast.parse((ROOT / "setup.py").read_text())  # read, don't build
    shipped = next(ast.literal_eval(node.value) for node in tree.body
                   if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "SHIPPED")
    manifest = (ROOT / "MANIFEST.in").read_text().split("\n")
    assert all(f"graft {s}" in manifest for s in shipped)
    from lightning_moe.experiments import conflict, continual, distill, moe_llava

    named = ["configs/mole/base.yaml", "configs/mole/lora.yaml", "configs/mole/mole.yaml", continual.PRETRAIN,
             continual.CONTINUAL, *(f"{distill.CONFIGS}/{n}.yaml" for n in ("teacher", "mimic_dense", "mimic_sparse",
                                                                         "preference")),
             *(f"configs/moe_llava/{n}.yaml" for n in ("stage1_align", "stage2_instruct", "stage3_moe")),
             conflict.DATA_ROOT, moe_llava.DATA_ROOT, "data/tokenizer"]
    for path in named:
        assert (ROOT / path).exists() and any(Path(path).is_relative_to(s) for s in shipped), path

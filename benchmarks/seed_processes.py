"""Seeds in parallel processes on a small machine: what `--jobs` costs when the processes have more torch threads
together than there are cores, and that the results do not move with it.

    python benchmarks/seed_processes.py [--steps 60] [--threads 2] [--seeds N] [--quick] [--out DIR]

Every seed trains the `make run` model (configs/quickstart.yaml: the tiny Llama with its MoE layer and the
tiny CLIP tower) for `--steps` steps on the shipped shapes data, through the CLI (`lightning_moe.cli.main`),
without validation, logger or checkpoint, and returns a digest of its trained weights. `--seeds` (by default
as many as the cores, 2 to 4: with `--threads 2` up to 4 cores are asked for twice their number) run four ways, each in spawned processes
(a fresh torch in each):

a. one at a time: one process of `--threads` threads (what `--jobs 1` runs, in a process of its own like the
   others);
b. at once through `experiments.map_seeds`, one process per seed, `--threads` threads each, with the waiting
   policy it gives them (`OMP_WAIT_POLICY=PASSIVE` when they ask for more threads than the cores:
   `seed_process_environment`);
c. at once, one process per seed, `--threads` threads each, with the environment's OMP_WAIT_POLICY (unset:
   OpenMP's default, a waiting thread spins for a while before it sleeps);
d. at once through `map_seeds` with 1 thread each: another float reduction order, so its digests should differ
   from a's (which makes the equality of b's and c's digests with a's a check that can fail).

Parity: each seed's digest in b and c equals its digest in a (else the script exits 1). The table gives each
way's wall time (process start-up and data set-up included: what a run of seeds costs) and its ratio to a,
with the date, the cores and the commit; `--out DIR` writes DIR/results.json.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
from lightning_moe.experiments import (_seed_worker_start, available_cores, map_seeds, quiet,  # noqa: E402
                                       seed_process_environment)
from lightning_moe.provenance import git_state, provenance_words  # noqa: E402


def train_seed(steps: int, quick: bool, seed: int) -> str:
    """The quickstart model trained `steps` steps at `seed`; a digest of its weights."""
    from lightning_moe.cli import main as cli_main

    smoke = ["--data.init_args.max_train_samples_per_domain=16", "--data.init_args.max_eval_samples_per_domain=1",
             "--data.init_args.batch_size=4"] if quick else []
    with tempfile.TemporaryDirectory() as tmp, quiet(Path(tmp) / "run.log"):
        cli = cli_main(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), f"--seed_everything={seed}",
                        f"--trainer.max_steps={steps}", "--trainer.limit_val_batches=0", "--trainer.logger=false",
                        "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
                        "--trainer.callbacks=null", *smoke])
    state = cli.model.state_dict()
    return hashlib.sha256(b"".join(state[name].detach().contiguous().numpy().tobytes()
                                   for name in sorted(state))).hexdigest()[:16]


def in_processes(train, seeds: list[int], processes: int, threads: int) -> dict[int, str]:
    """The seeds in `processes` spawned processes of `threads` threads each, with this process's environment as it
    is (no waiting policy added)."""
    with ProcessPoolExecutor(max_workers=processes, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_seed_worker_start, initargs=(threads,)) as pool:
        return dict(zip(seeds, pool.map(train, seeds)))


def timed(run) -> tuple[dict[int, str], float]:
    start = time.perf_counter()
    digests = run()
    return digests, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps per seed")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each process in ways a to c")
    parser.add_argument("--seeds", type=int, default=max(2, min(available_cores(), 4)),
                        help="how many seeds, at least 2 (processes at once in b to d; default: one per core, 2 to 4)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 steps of batch 4 on 16 samples per domain, ways a and b only")
    parser.add_argument("--out", type=Path, default=None, help="also write results.json here")
    args = parser.parse_args()
    if args.seeds < 2:
        parser.error("--seeds must be at least 2: one seed runs in this process, never at once")
    provenance = git_state()  # when the run starts
    if args.quick:
        args.steps = 2
    seeds, cores = list(range(args.seeds)), available_cores()
    train = partial(train_seed, args.steps, args.quick)
    policy = seed_process_environment(len(seeds), args.threads, cores).get("OMP_WAIT_POLICY", "unchanged")
    ways = {  # key: (row label, processes x threads, the run)
        "a": ("a. one at a time", f"1 x {args.threads}", lambda: in_processes(train, seeds, 1, args.threads)),
        "b": (f"b. at once, map_seeds: wait policy {policy}", f"{len(seeds)} x {args.threads}",
              lambda: map_seeds(train, seeds, len(seeds), args.threads)),
        "c": (f"c. at once, OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset')}",
              f"{len(seeds)} x {args.threads}", lambda: in_processes(train, seeds, len(seeds), args.threads)),
        "d": ("d. at once, 1 thread each", f"{len(seeds)} x 1", lambda: map_seeds(train, seeds, len(seeds), 1)),
    }
    if args.quick:  # each way starts fresh processes, which import torch, Lightning and transformers
        del ways["c"], ways["d"]
    found = {key: timed(run) for key, (_, _, run) in ways.items()}
    reference_digests, reference_time = found["a"]
    stamp = (f"{datetime.date.today()}, {platform.machine()} {cores} cores, torch {torch.__version__}, "
             f"{provenance_words(provenance)}")
    print(f"{stamp}, {len(seeds)} seeds of {args.steps} quickstart steps\n")
    print("| way | processes x threads | wall s | / one at a time | weights equal to a's |\n|---|---|---|---|---|")
    rows = {}
    for key, (label, shape, _) in ways.items():
        digests, seconds = found[key]
        same = digests == reference_digests
        rows[key] = {"way": label, "processes_x_threads": shape, "wall_s": seconds,
                     "ratio": seconds / reference_time, "weights_equal": same}
        print(f"| {label} | {shape} | {seconds:.1f} | {seconds / reference_time:.2f} | {'yes' if same else 'no'} |")
    parity = all(row["weights_equal"] for key, row in rows.items() if key != "d")
    sensitive = None if "d" not in rows else not rows["d"]["weights_equal"]
    print()
    print("parity: ok (every seed's weights are bit for bit the same one at a time and at once)" if parity else
          "parity: FAILED (a seed's weights changed with the number of processes at once)")
    if sensitive is not None:
        print("the weights depend on the thread count (d differs from a): the check can fail" if sensitive else
              "note: 1 and 2 threads gave the same weights here, so the check above cannot tell reduction orders apart")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps({
            "stamp": stamp, **provenance, "command": " ".join(["python", *sys.argv]), "steps": args.steps,
            "seeds": len(seeds), "threads": args.threads, "cores": cores, "rows": list(rows.values()), "parity": parity,
            "thread_count_changes_weights": sensitive}, indent=2))
    return 0 if parity else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Seeds in parallel processes on a small machine: what `--jobs` costs and saves when the processes have more
torch threads together than there are cores, and that the results do not move with it.

    python benchmarks/seed_processes.py [--steps 60] [--threads 2] [--seeds 2] [--quick] [--out DIR]

Every seed trains the `make run` model (configs/quickstart.yaml: the tiny Llama with its MoE layer and the
tiny CLIP tower) for `--steps` steps on the shipped shapes data, through the CLI (`lightning_moe.cli.main`),
without validation, logger or checkpoint, and returns a digest of its trained weights. The seeds run four ways,
each through `experiments.map_seeds` or a pool like it (spawned processes, a fresh torch in each):

a. one at a time: one process, `--threads` threads (`--jobs 1`, but in a process of its own like the others);
b. all at once, one process per seed, `--threads` threads each, the waiting policy `map_seeds` gives them
   (`OMP_WAIT_POLICY=PASSIVE` when they ask for more threads than the cores: `seed_process_environment`);
c. as b, with OMP_WAIT_POLICY=ACTIVE (OpenMP's spinning waits, what b had before `map_seeds` set the policy);
d. all at once with 1 thread each: a different float reduction order, so its digests should differ from a's
   (that is what makes the equality of b's and c's digests with a's a check that can fail).

Parity: each seed's digest in b and c equals its digest in a (else the script exits 1). The table gives each
way's wall time (process start-up and data set-up included: what a run of seeds costs) and its ratio to a,
with the date, the threads and the commit; `--out DIR` writes DIR/results.json.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import multiprocessing
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
from lightning_moe.experiments import (_seed_worker_start, available_cores, environment_variables,  # noqa: E402
                                       map_seeds, quiet, seed_process_environment)
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


def one_at_a_time(fn, seeds: list[int], threads: int) -> dict[int, str]:
    """The seeds one after another in one spawned process of `threads` threads."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_seed_worker_start, initargs=(threads,)) as pool:
        return dict(zip(seeds, pool.map(fn, seeds)))


def timed(run) -> tuple[dict[int, str], float]:
    start = time.perf_counter()
    digests = run()
    return digests, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps per seed")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each process in ways a to c")
    parser.add_argument("--seeds", type=int, default=2, help="how many seeds (processes at once in b to d)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 steps of batch 4 on 16 samples, without way c (the slowest)")
    parser.add_argument("--out", type=Path, default=None, help="also write results.json here")
    args = parser.parse_args()
    provenance = git_state()  # when the run starts
    if args.quick:
        args.steps = 2
    seeds, cores = list(range(args.seeds)), available_cores()
    fn = partial(train_seed, args.steps, args.quick)
    policy = seed_process_environment(len(seeds), args.threads, cores).get("OMP_WAIT_POLICY", "unchanged")
    ways = {
        "a. one at a time": (f"1 x {args.threads}", lambda: one_at_a_time(fn, seeds, args.threads)),
        f"b. at once, wait policy {policy}": (f"{len(seeds)} x {args.threads}",
                                              lambda: map_seeds(fn, seeds, len(seeds), args.threads)),
        "c. at once, OMP_WAIT_POLICY=ACTIVE": (f"{len(seeds)} x {args.threads}", lambda: _active(fn, seeds, args)),
        "d. at once, 1 thread each": (f"{len(seeds)} x 1", lambda: map_seeds(fn, seeds, len(seeds), 1)),
    }
    if args.quick:
        ways = {name: way for name, way in ways.items() if not name.startswith("c.")}
    found = {name: timed(run) for name, (_, run) in ways.items()}
    reference_digests, reference_time = found["a. one at a time"]
    stamp = (f"{datetime.date.today()}, {platform.machine()} {cores} cores, torch {torch.__version__}, "
             f"{provenance_words(provenance)}")
    print(f"{stamp}, {len(seeds)} seeds of {args.steps} quickstart steps\n")
    print("| way | processes x threads | wall s | / one at a time | weights equal to a's |\n|---|---|---|---|---|")
    rows = []
    for name, (shape, _) in ways.items():
        digests, seconds = found[name]
        same = digests == reference_digests
        rows.append({"way": name, "processes_x_threads": shape, "wall_s": seconds,
                     "ratio": seconds / reference_time, "weights_equal": same})
        print(f"| {name} | {shape} | {seconds:.1f} | {seconds / reference_time:.2f} | {'yes' if same else 'no'} |")
    parity = all(row["weights_equal"] for row in rows if not row["way"].startswith("d."))
    sensitive = not rows[-1]["weights_equal"]
    print()
    print("parity: ok (every seed's weights are bit for bit the same one at a time and at once)" if parity else
          "parity: FAILED (a seed's weights changed with the number of processes at once)")
    print("the weights depend on the thread count (d differs from a): the check can fail" if sensitive else
          "note: 1 and 2 threads gave the same weights here, so the check above cannot tell reduction orders apart")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps({
            "stamp": stamp, **provenance, "command": " ".join(["python", *sys.argv]), "steps": args.steps,
            "seeds": len(seeds), "threads": args.threads, "cores": cores, "rows": rows, "parity": parity,
            "thread_count_changes_weights": sensitive}, indent=2))
    return 0 if parity else 1


def _active(fn, seeds: list[int], args: argparse.Namespace) -> dict[int, str]:
    with environment_variables({"OMP_WAIT_POLICY": "ACTIVE"}):
        return map_seeds(fn, seeds, len(seeds), args.threads)


if __name__ == "__main__":
    raise SystemExit(main())

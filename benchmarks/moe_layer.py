"""Speed of `SparseMoE` (forward + backward) against Hugging Face's Mixtral block and a dense FFN,
and of its dispatch paths in bfloat16, eager against `torch.compile`.

    python benchmarks/moe_layer.py [--quick] [--out DIR] [--device cuda]
    python benchmarks/moe_layer.py --expert-parallel [--quick]   (experts split over 2 processes: the end of this file)

First table, float32: for each shape (tokens, hidden, intermediate, experts, top-k) it times, in this
process and on identical weights: ours (eager, and compiled by `torch.compile` with the default inductor
backend; `--quick` uses `aot_eager`, the same traced graph without inductor's code generation, unless
`--compile-backend inductor`), the Hugging Face `MixtralSparseMoeBlock` with the `eager` and the
`grouped_mm` experts implementations, and a dense SwiGLU FFN with the same active compute
(intermediate size k x I). In float32 the compiled layer takes the dispatch that runs every expert on
every token (`SparseMoE._experts_traceable`: torch 2.13 cannot trace float32 grouped_mm).

Second table, bfloat16: our layer's eager dispatch on this device (`SparseMoE.dispatch_path`), the other
eager dispatch forced, and the compiled layer, which traces the dropless grouped dispatch
(`run_sorted_experts`), with its ratio to eager measured in the same run.

Implementations are interleaved inside each repetition so that background load hits all of them alike;
the median over repetitions after warm-up is reported. Compilation and first steps are warm-up, outside
the timing. Where the compiler cannot run here, the compiled column says why and the rest runs as before.
`--device cuda` runs the same tables on the GPU (each step synchronised before its clock stops) and adds
a CUDA-only count of host synchronisations per step for each dispatch; without a GPU it runs on the CPU
and prints why the CUDA-only rows are skipped.
Prints markdown tables with the date and the machine; `--out DIR` also writes DIR/results.json (the
rows the report plots: `python -m lightning_moe.experiments.report`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import MixtralConfig
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, grouped_mm_experts_forward
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from lightning_moe.provenance import git_state, provenance_words  # noqa: E402
from lightning_moe.layers import SparseMoE  # noqa: E402

SHAPES = [(16, 512, 1024, 8, 2), (512, 128, 256, 4, 2), (512, 128, 256, 16, 2), (4096, 512, 1024, 8, 2)]
# --quick: the same four roles (few tokens; 4 and 16 experts at equal tokens; many tokens), small enough for the tests
QUICK_SHAPES = [(16, 64, 128, 8, 2), (128, 32, 64, 4, 2), (128, 32, 64, 16, 2), (512, 64, 128, 8, 2)]
# the bfloat16 dispatch table: few tokens (weight bytes dominate), a few hundred tokens, many tokens
BF16_SHAPES = [SHAPES[0], SHAPES[1], SHAPES[3]]
QUICK_BF16_SHAPES = [QUICK_SHAPES[0], QUICK_SHAPES[1], QUICK_SHAPES[3]]


class DenseSwiGLU(nn.Module):
    """Llama-style MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def hf_block(hidden: int, inter: int, experts: int, k: int, impl: str) -> MixtralSparseMoeBlock:
    cfg = MixtralConfig(
        hidden_size=hidden, intermediate_size=inter, num_local_experts=experts, num_experts_per_tok=k,
        experts_implementation=impl,
    )
    block = MixtralSparseMoeBlock(cfg)
    chosen = ALL_EXPERTS_FUNCTIONS.get_interface(block.experts.config._experts_implementation, None)
    # make sure the config really switched the experts' forward
    assert (chosen is grouped_mm_experts_forward) == (impl == "grouped_mm"), impl
    return block


def step_fn(module: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    """One training step; on CUDA it waits for the device, so the clock measures the step's work."""

    def step() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).backward(grad)
        if x.is_cuda:
            torch.cuda.synchronize()

    return step


def time_interleaved(fns: dict[str, callable], reps: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    medians = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    return medians | {f"{name}_min": min(ts) * 1e3 for name, ts in times.items()}


def compiled_step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, ref: torch.Tensor, dynamic: bool | None,
                  backend: str = "inductor"):
    """The training step of `torch.compile(module, backend=backend)`, compiled here and checked against `ref`;
    or the reason it cannot run on this machine (no C++ compiler, an inductor error) as a string."""
    compiled = torch.compile(module, dynamic=dynamic, backend=backend)
    try:
        out = compiled(x)  # compiles the training graph the timed steps reuse
    except Exception as err:  # noqa: BLE001  (any compiler failure: reported, not fatal)
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:200]
    assert_same_answer(out.detach(), ref)
    return step_fn(compiled, x, grad)


def assert_same_answer(out: torch.Tensor, ref: torch.Tensor) -> None:
    """float32: within float32 rounding of a sum of a few hundred products; bfloat16 (8 significant bits):
    within two roundings of the largest output, as the two sides may sum in other orders."""
    if out.dtype == torch.bfloat16:
        err, scale = (out.float() - ref.float()).abs().max().item(), ref.float().abs().max().item()
        assert err <= 2 * 2**-8 * scale, f"bfloat16 outputs differ by {err:.3e} (largest {scale:.3e})"
    else:
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def bench_shape(tokens: int, hidden: int, inter: int, experts: int, k: int, reps: int, warmup: int,
                compile_dynamic: bool | None = None, backend: str = "inductor",
                device: str = "cpu") -> tuple[dict[str, float], str | None]:
    """Median (and best) times of each implementation, and why the compiled one did not run (or None)."""
    torch.manual_seed(0)
    eager = hf_block(hidden, inter, experts, k, "eager")
    for p in eager.parameters():
        nn.init.normal_(p, std=0.02)
    eager.to(device)
    grouped = hf_block(hidden, inter, experts, k, "grouped_mm").to(device)
    grouped.load_state_dict(eager.state_dict())
    ours = SparseMoE.from_mixtral(eager)
    dense = DenseSwiGLU(hidden, k * inter).to(device)
    x = torch.randn(1, tokens, hidden, device=device, requires_grad=True)
    grad = torch.randn(1, tokens, hidden, device=device)
    with torch.no_grad():  # same weights, same answer: the comparison is fair
        ref = eager(x)
        for m in (grouped, ours):
            torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-5)
    fns = {
        "ours": step_fn(ours, x, grad),
        "hf_eager": step_fn(eager, x, grad),
        "hf_grouped_mm": step_fn(grouped, x, grad),
        "dense": step_fn(dense, x, grad),
    }
    compiled = compiled_step(ours, x, grad, ref, compile_dynamic, backend)
    if callable(compiled):
        fns["ours_compiled"] = compiled
    return time_interleaved(fns, reps, warmup), None if callable(compiled) else compiled


def bench_bf16_shape(tokens: int, hidden: int, inter: int, experts: int, k: int, reps: int, warmup: int,
                     compile_dynamic: bool | None, backend: str, device: str) -> tuple[dict[str, float], str | None]:
    """bfloat16 times of our layer: "eager" (the dispatch eager takes on this device), "eager_other" (the other
    eager dispatch, forced) and "compiled" (the grouped dispatch the trace takes), and why compiling failed."""
    torch.manual_seed(0)
    block = hf_block(hidden, inter, experts, k, "eager")
    for p in block.parameters():
        nn.init.normal_(p, std=0.02)
    ours = SparseMoE.from_mixtral(block).to(device=device, dtype=torch.bfloat16)
    other = SparseMoE.from_mixtral(block).to(device=device, dtype=torch.bfloat16)
    path = ours.dispatch_path(torch.bfloat16, torch.device(device))
    other_path = "grouped" if path == "sorted" else "sorted"
    other.dispatch_path = lambda dtype, dev: other_path  # forced, whatever the rule picks
    x = torch.randn(1, tokens, hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(1, tokens, hidden, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = ours(x)
        assert_same_answer(other(x), ref)
    fns = {"eager": step_fn(ours, x, grad), "eager_other": step_fn(other, x, grad)}
    compiled = compiled_step(ours, x, grad, ref, compile_dynamic, backend)
    if callable(compiled):
        fns["compiled"] = compiled
    times = time_interleaved(fns, reps, warmup)
    return times | {"eager_path": path, "other_path": other_path}, None if callable(compiled) else compiled


def host_syncs_per_step(device: str) -> dict[str, int] | str:
    """CUDA only: host synchronisations in one training step of a small bfloat16 layer per dispatch path
    (torch.cuda's sync debug mode warns at each), or why they are not counted."""
    if device != "cuda":
        return "the CPU has no device to synchronise with"
    import warnings

    counts = {}
    for path in ("sorted", "grouped"):
        moe = SparseMoE(128, 256, 8, 2).to(device=device, dtype=torch.bfloat16)
        moe.dispatch_path = lambda dtype, dev, path=path: path
        x = torch.randn(256, 128, device=device, dtype=torch.bfloat16, requires_grad=True)
        step = step_fn(moe, x, torch.randn_like(x))
        step()  # warm-up: lazy initialisations synchronise once
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                moe.zero_grad(set_to_none=True)
                moe(x).backward(torch.ones_like(x))
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts[path] = sum("synchroniz" in str(w.message) for w in caught)
    return counts


def compiled_cells(r: dict[str, float]) -> str:
    """The compiled time and its ratio to our eager layer (median, and from the fastest repetition)."""
    if "ours_compiled" not in r:
        return "n/a | n/a"
    return (f"{r['ours_compiled']:.2f} | {r['ours_compiled'] / r['ours']:.2f} "
            f"({r['ours_compiled_min'] / r['ours_min']:.2f})")


def bf16_table(shapes: list[tuple[int, ...]], quick: bool, backend: str, device: str,
               compile_failures: list[str]) -> list[dict]:
    """The bfloat16 dispatch table: eager (the default dispatch here, and the other one), compiled, ratios."""
    print()
    print(f"### bfloat16: eager dispatch against the compiled grouped dispatch ({backend}), {device}")
    print()
    print("| tokens | hidden | inter | experts | k | eager (dispatch) | eager, other dispatch | compiled "
          "| compiled / eager | other / eager |")
    print("|---:|---:|---:|---:|---:|---|---|---:|---:|---:|")
    rows = []
    for shape in shapes:
        reps, warmup = (2, 1) if quick else ((7, 2) if shape[0] >= 4096 else (31, 5))
        r, not_compiled = bench_bf16_shape(*shape, reps=reps, warmup=warmup, compile_dynamic=True if quick else None,
                                           backend=backend, device=device)
        if not_compiled:
            compile_failures.append(f"bfloat16 {shape}: {not_compiled}")

        def ratio(a: str, b: str) -> str:
            return f"{r[a] / r[b]:.2f} ({r[a + '_min'] / r[b + '_min']:.2f})" if a in r else "n/a"

        compiled = f"{r['compiled']:.2f}" if "compiled" in r else "n/a"
        print(f"| {' | '.join(map(str, shape))} | {r['eager']:.2f} ({r['eager_path']}) "
              f"| {r['eager_other']:.2f} ({r['other_path']}) | {compiled} | {ratio('compiled', 'eager')} "
              f"| {ratio('eager_other', 'eager')} |", flush=True)
        rows.append({**dict(zip(("tokens", "hidden", "inter", "experts", "k"), shape)), **r,
                     **({"compiled_over_eager": r["compiled"] / r["eager"]} if "compiled" in r else {})})
    return rows


def float32_table(shapes: list[tuple[int, ...]], quick: bool, backend: str, device: str,
                  compile_failures: list[str]) -> dict[tuple[int, ...], dict[str, float]]:
    """The float32 table: ours, Hugging Face's two experts implementations, dense, and ours compiled."""
    print(f"### float32: ours against Hugging Face and a dense FFN, {device}")
    print()
    print("| tokens | hidden | inter | experts | k | ours | HF eager | HF grouped_mm | dense "
          f"| ours / best HF | ours / dense | goal | met | ours compiled ({backend}) | compiled / ours |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|")
    results = {}
    for shape in shapes:
        tokens = shape[0]
        reps, warmup = (2, 1) if quick else ((7, 2) if tokens >= 4096 else (31, 5))
        # --quick: one dynamic-shape compilation serves several shapes (inductor compiles in tens of seconds)
        r, not_compiled = bench_shape(*shape, reps=reps, warmup=warmup, compile_dynamic=True if quick else None,
                                      backend=backend, device=device)
        if not_compiled:
            compile_failures.append(f"{shape}: {not_compiled}")
        results[shape] = r
        ratios = {}
        for sfx in ("", "_min"):
            best_hf = min(r["hf_eager" + sfx], r["hf_grouped_mm" + sfx])
            ratios[sfx] = (r["ours" + sfx] / best_hf, r["ours" + sfx] / r["dense" + sfx])
        if shape == shapes[3]:
            goal, limit, which = "<= 1.1 x dense", 1.1, 1
        elif shape in shapes[1:3]:
            goal, limit, which = "<= 0.8 x best HF", 0.8, 0
        else:
            goal, limit, which = "<= 1.0 x best HF", 1.0, 0
        met = ratios[""][which] <= limit
        met_min = ratios["_min"][which] <= limit
        print(
            f"| {' | '.join(map(str, shape))} | {r['ours']:.2f} | {r['hf_eager']:.2f} | {r['hf_grouped_mm']:.2f} "
            f"| {r['dense']:.2f} | {ratios[''][0]:.2f} ({ratios['_min'][0]:.2f}) "
            f"| {ratios[''][1]:.2f} ({ratios['_min'][1]:.2f}) | {goal} "
            f"| {'yes' if met else 'no'} ({'yes' if met_min else 'no'}) | {compiled_cells(r)} |",
            flush=True,
        )
    four, sixteen = results[shapes[1]], results[shapes[2]]
    scale = {sfx: sixteen["ours" + sfx] / four["ours" + sfx] for sfx in ("", "_min")}
    print()
    print(
        f"4 -> 16 experts at {shapes[1][0]} tokens: ours x{scale['']:.2f} (x{scale['_min']:.2f}; goal <= 1.2: "
        f"{'yes' if scale[''] <= 1.2 else 'no'}), HF eager x{sixteen['hf_eager'] / four['hf_eager']:.2f}, "
        f"HF grouped_mm x{sixteen['hf_grouped_mm'] / four['hf_grouped_mm']:.2f}, "
        f"dense x{sixteen['dense'] / four['dense']:.2f}"
    )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions and no 4096-token shape, for a smoke run")
    parser.add_argument("--out", type=Path, default=None, help="also write results.json here")
    parser.add_argument("--compile-backend", default=None, choices=("inductor", "aot_eager"),
                        help="torch.compile backend of the compiled column (default: inductor; with --quick aot_eager, "
                             "which traces and checks the same graph without inductor's code generation, about 35 s "
                             "of a cold cache)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where the layers run (cuda: falls back to the CPU, saying so, when there is no GPU)")
    parser.add_argument("--only", default=None, choices=("float32", "bf16"), help="run one of the two tables")
    args = parser.parse_args()
    provenance = git_state()  # the commit the run starts from (and whether the tree is dirty)
    backend = args.compile_backend or ("aot_eager" if args.quick else "inductor")
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: the tables run on the CPU, and the CUDA-only rows are skipped")
        device = "cpu"
    where = torch.cuda.get_device_name() if device == "cuda" else f"{platform.machine()}, {os.cpu_count()} CPUs"
    print(f"## SparseMoE forward+backward, {datetime.date.today().isoformat()}")
    print()
    print(
        f"machine: {where}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, transformers {transformers.__version__}; "
        f"load average at start {os.getloadavg()[0]:.1f} (a shared machine: see the best-of-reps columns); "
        f"{provenance_words(provenance)}"
    )
    print()
    print("Times are medians over repetitions (ms); ratios from medians, and in brackets from the fastest repetition.")
    print()
    compile_failures = []
    results = {}
    if args.only in (None, "float32"):
        results = float32_table(QUICK_SHAPES if args.quick else SHAPES, args.quick, backend, device, compile_failures)
    bf16 = []
    if args.only in (None, "bf16"):
        bf16 = bf16_table(QUICK_BF16_SHAPES if args.quick else BF16_SHAPES, args.quick, backend, device,
                          compile_failures)
    syncs = host_syncs_per_step(device)
    print()
    if isinstance(syncs, str):
        print(f"host synchronisations per step: not counted ({syncs})")
    else:
        print("host synchronisations per bfloat16 training step (torch.cuda sync debug mode): "
              + ", ".join(f"{path} dispatch {n}" for path, n in syncs.items()))
    for failure in compile_failures:
        print(f"torch.compile ({backend}) did not run, so no compiled time: {failure}")
    print(f"load average at end {os.getloadavg()[0]:.1f}")
    checked = []
    if results:
        checked.append(f"ours, ours compiled ({backend}) where it ran, and HF grouped_mm matched HF eager on the same "
                       "weights, every shape")
    if bf16:
        checked.append("in bfloat16 both eager dispatches and the compiled layer agreed within bfloat16 rounding")
    print(f"parity: ok ({'; '.join(checked)})")
    if args.out:
        rows = [{**dict(zip(("tokens", "hidden", "inter", "experts", "k"), shape)), **r,
                 "ours_over_dense": r["ours"] / r["dense"],
                 "ours_over_best_hf": r["ours"] / min(r["hf_eager"], r["hf_grouped_mm"]),
                 **({"compiled_over_ours": r["ours_compiled"] / r["ours"]} if "ours_compiled" in r else {})}
                for shape, r in results.items()]
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps({
            "date": datetime.date.today().isoformat(), "torch_threads": torch.get_num_threads(),
            "command": "python benchmarks/moe_layer.py" + (" --quick" if args.quick else "")
            + (f" --compile-backend {args.compile_backend}" if args.compile_backend else "")
            + (f" --device {args.device}" if args.device != "cpu" else "")
            + (f" --only {args.only}" if args.only else ""),
            "device": device, "compile_backend": backend, **provenance, "rows": rows, "bf16_dispatch": bf16,
            "host_syncs_per_step": syncs}, indent=1))

# ----------------------------------------------------------------------------- expert parallelism
# python benchmarks/moe_layer.py --expert-parallel [--quick]: the same layer with its experts split over 2 CPU processes
# (gloo; lightning_moe/layers/expert_parallel.py) against one process on both ranks' tokens, and the all-to-all
# traffic of one training step. Each rank sends a pair's token row to the rank of its expert and gets the expert's
# output row back (forward), and the gradients of both the same way (backward): 4 rows of `hidden` values per pair
# whose expert lies on the other rank, plus the per-expert pair counts (int64) once per forward.
EP_RANKS = 2
EP_SHAPES = [(512, 128, 256, 8, 2), (2048, 512, 1024, 8, 2)]  # (tokens per rank, hidden, inter, experts, k)
EP_QUICK_SHAPES = [(128, 32, 64, 4, 2)]


def all_to_all_bytes(indices: torch.Tensor, rank: int, experts: int, hidden: int, element_size: int) -> int:
    """Bytes rank `rank` sends to the other ranks in one forward+backward, given its tokens' chosen experts."""
    off_rank_pairs = int((indices // (experts // EP_RANKS) != rank).sum())
    counts = experts // EP_RANKS * (EP_RANKS - 1) * 8
    return 4 * off_rank_pairs * hidden * element_size + counts


def expert_parallel_rank(rank: int, port: int, shapes: list[tuple], reps: int, warmup: int) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_moe.cli import leave_process_group_and_exit
    from lightning_moe.layers.expert_parallel import shard_layer_experts

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=EP_RANKS)
    mesh = init_device_mesh("cpu", (EP_RANKS,))
    for tokens, hidden, inter, experts, k in shapes:
        torch.manual_seed(0)  # the same layer and tokens on both ranks
        whole = SparseMoE(hidden, inter, experts, k)
        nn.init.normal_(whole.router.proj.weight, std=0.5)  # decisive routing: tokens spread over the experts
        x_all = torch.randn(EP_RANKS * tokens, hidden, requires_grad=True)
        grad_all = torch.randn(EP_RANKS * tokens, hidden)
        x = x_all.detach()[rank * tokens:(rank + 1) * tokens].clone().requires_grad_()
        grad = grad_all[rank * tokens:(rank + 1) * tokens]
        split = SparseMoE(hidden, inter, experts, k)
        split.load_state_dict(whole.state_dict())
        shard_layer_experts(split, mesh)
        with torch.no_grad():
            torch.testing.assert_close(split(x), whole(x_all)[rank * tokens:(rank + 1) * tokens], rtol=1e-4, atol=1e-5)
        sent = torch.tensor(all_to_all_bytes(split.last_routing.indices, rank, experts, hidden, x.element_size()))
        times = time_interleaved({"ep": step_fn(split, x, grad)}, reps, warmup)
        if rank == 0:  # one process on both ranks' tokens, while the other rank waits
            times |= time_interleaved({"one": step_fn(whole, x_all, grad_all)}, reps, warmup)
        slowest = torch.tensor(times["ep"])
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        dist.all_reduce(sent)
        if rank == 0:
            print(f"| {tokens} | {hidden} | {inter} | {experts} | {k} | {slowest.item():.2f} | {times['one']:.2f} "
                  f"| {int(sent) / EP_RANKS / 1e6:.3f} |", flush=True)
        dist.barrier()
    leave_process_group_and_exit()  # the mesh and the sharded layers still hold the group


def expert_parallel_main() -> None:
    import socket

    import torch.multiprocessing as mp

    quick = "--quick" in sys.argv
    shapes, reps, warmup = (EP_QUICK_SHAPES, 2, 1) if quick else (EP_SHAPES, 11, 2)
    print(f"## SparseMoE forward+backward, experts split over {EP_RANKS} CPU processes (gloo), "
          f"{datetime.date.today().isoformat()}")
    print()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, 1 torch thread per process, "
          f"torch {torch.__version__}; "
          f"load average at start {os.getloadavg()[0]:.1f}; {provenance_words(git_state())}")
    print()
    print("Medians over repetitions (ms); expert parallel: the slower rank. One process: the layer with every expert "
          f"on the {EP_RANKS} ranks' tokens together. All-to-all: bytes one rank sends to the other per training step.")
    print()
    print("| tokens per rank | hidden | inter | experts | k | expert parallel | one process, all tokens "
          "| all-to-all MB per rank and step |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(expert_parallel_rank, args=(port, shapes, reps, warmup), nprocs=EP_RANKS)
    print("parity: ok (the expert-parallel layer's output matched the one-process layer's on the same weights)")


if __name__ == "__main__":
    expert_parallel_main() if "--expert-parallel" in sys.argv else main()

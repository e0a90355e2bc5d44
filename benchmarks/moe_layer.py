"""Speed of `SparseMoE` (forward + backward) against Hugging Face's Mixtral block and a dense FFN.

    python benchmarks/moe_layer.py [--quick] [--out DIR]

For each shape (tokens, hidden, intermediate, experts, top-k) it times, in this process and on
identical weights: ours (eager, and compiled by `torch.compile` with the default inductor backend;
`--quick` uses `aot_eager`, the same traced graph without inductor's code generation, unless
`--compile-backend inductor`), the Hugging Face `MixtralSparseMoeBlock` with the `eager` and the
`grouped_mm` experts implementations, and a dense SwiGLU FFN with the same active compute
(intermediate size k x I). Implementations are interleaved inside each repetition so that
background load hits all of them alike; the median over repetitions after warm-up is reported.
The compiled layer takes the trace-friendly dispatch (every expert on every token,
`SparseMoE._experts_traceable`); its compilation and first steps are warm-up, outside the timing, and it
is timed against our eager layer in the same process. Where inductor cannot compile here, the compiled
column says why and the rest of the table runs as before.
Prints a markdown table with the date and the machine; `--out DIR` also writes DIR/results.json (the
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
from lightning_moe.experiments.provenance import git_state, provenance_words  # noqa: E402
from lightning_moe.layers import SparseMoE  # noqa: E402

SHAPES = [(16, 512, 1024, 8, 2), (512, 128, 256, 4, 2), (512, 128, 256, 16, 2), (4096, 512, 1024, 8, 2)]
# --quick: the same four roles (few tokens; 4 and 16 experts at equal tokens; many tokens), small enough for the tests
QUICK_SHAPES = [(16, 64, 128, 8, 2), (128, 32, 64, 4, 2), (128, 32, 64, 16, 2), (512, 64, 128, 8, 2)]


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
    def step() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).backward(grad)

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
    torch.testing.assert_close(out.detach(), ref, rtol=1e-4, atol=1e-5)
    return step_fn(compiled, x, grad)


def bench_shape(tokens: int, hidden: int, inter: int, experts: int, k: int, reps: int, warmup: int,
                compile_dynamic: bool | None = None, backend: str = "inductor") -> tuple[dict[str, float], str | None]:
    """Median (and best) times of each implementation, and why the compiled one did not run (or None)."""
    torch.manual_seed(0)
    eager = hf_block(hidden, inter, experts, k, "eager")
    for p in eager.parameters():
        nn.init.normal_(p, std=0.02)
    grouped = hf_block(hidden, inter, experts, k, "grouped_mm")
    grouped.load_state_dict(eager.state_dict())
    ours = SparseMoE.from_mixtral(eager)
    dense = DenseSwiGLU(hidden, k * inter)
    x = torch.randn(1, tokens, hidden, requires_grad=True)
    grad = torch.randn(1, tokens, hidden)
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


def compiled_cells(r: dict[str, float]) -> str:
    """The compiled time and its ratio to our eager layer (median, and from the fastest repetition)."""
    if "ours_compiled" not in r:
        return "n/a | n/a"
    return (f"{r['ours_compiled']:.2f} | {r['ours_compiled'] / r['ours']:.2f} "
            f"({r['ours_compiled_min'] / r['ours_min']:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions and no 4096-token shape, for a smoke run")
    parser.add_argument("--out", type=Path, default=None, help="also write results.json here")
    parser.add_argument("--compile-backend", default=None, choices=("inductor", "aot_eager"),
                        help="torch.compile backend of the compiled column (default: inductor; with --quick aot_eager, "
                             "which traces and checks the same graph without inductor's code generation, about 35 s "
                             "of a cold cache)")
    args = parser.parse_args()
    provenance = git_state()  # the commit the run starts from (and whether the tree is dirty)
    backend = args.compile_backend or ("aot_eager" if args.quick else "inductor")
    print(f"## SparseMoE forward+backward, {datetime.date.today().isoformat()}")
    print()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, transformers {transformers.__version__}; "
        f"load average at start {os.getloadavg()[0]:.1f} (a shared machine: see the best-of-reps columns); "
        f"{provenance_words(provenance)}"
    )
    print()
    print("Times are medians over repetitions (ms); ratios from medians, and in brackets from the fastest repetition.")
    print()
    print("| tokens | hidden | inter | experts | k | ours | HF eager | HF grouped_mm | dense "
          f"| ours / best HF | ours / dense | goal | met | ours compiled ({backend}) | compiled / ours |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|")
    results, compile_failures = {}, []
    shapes = QUICK_SHAPES if args.quick else SHAPES
    for shape in shapes:
        tokens = shape[0]
        reps, warmup = (2, 1) if args.quick else ((7, 2) if tokens >= 4096 else (31, 5))
        # --quick: one dynamic-shape compilation serves several shapes (inductor compiles in tens of seconds)
        r, not_compiled = bench_shape(*shape, reps=reps, warmup=warmup, compile_dynamic=True if args.quick else None,
                                      backend=backend)
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
    for failure in compile_failures:
        print(f"torch.compile ({backend}) did not run, so no compiled time: {failure}")
    print(f"load average at end {os.getloadavg()[0]:.1f}")
    print(f"parity: ok (ours, ours compiled ({backend}) where it ran, and HF grouped_mm matched HF eager on the same "
          "weights, every shape)")
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
            + (f" --compile-backend {args.compile_backend}" if args.compile_backend else ""),
            "compile_backend": backend, **provenance, "rows": rows}, indent=1))

if __name__ == "__main__":
    main()

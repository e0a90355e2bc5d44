"""Speed and memory of LoRA-expert adapters on one MLP (forward + backward).

    python benchmarks/lora_experts.py [--quick]

On a Llama-style MLP (frozen base), times in this process, interleaved, median after warm-up:
  - plain LoRA of rank r on gate/up/down (ours, `LoRALinear`; peft's LoRA `Linear` for reference),
  - MoLE (`MoLEMLP`, E experts of rank r, top-1, sparse dispatch),
  - a dense mixture running every expert on every token, weighted by the router's softmax
    (the LoRAMoE style, written as efficiently as it goes: one (E*r)-wide matmul per side),
  - MoRA (`MoRALinear`, rank R, all ranks / a top-k budget) against LoRA of the same total rank R.
Peak memory is the peak of bytes held by tensors created during one forward + backward
(activations, saved tensors, gradients), counted by a dispatch mode; weights made before are
not counted. Prints a markdown table with the date and the machine.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
import weakref
from pathlib import Path

import torch
from peft import LoraConfig
from peft.tuners.lora import Linear as PeftLoraLinear
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from lightning_moe.layers import LoRALinear, MoLEMLP, MoRALinear  # noqa: E402


class MLP(nn.Module):
    """Llama-style gated MLP (gate_proj, up_proj, down_proj, act_fn)."""

    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DenseLoRAMixture(nn.Module):
    """Every token through all E LoRA experts of each projection, weighted by softmax(router(x))."""

    def __init__(self, mlp: MLP, num_experts: int, r: int, alpha: float) -> None:
        super().__init__()
        self.mlp, self.E, self.r, self.scaling = mlp.requires_grad_(False), num_experts, r, alpha / r
        self.router = nn.Linear(mlp.gate_proj.in_features, num_experts)
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        for name in ("gate_proj", "up_proj", "down_proj"):
            lin = getattr(mlp, name)
            self.A[name] = nn.Parameter(torch.randn(num_experts * r, lin.in_features) * 0.01)
            self.B[name] = nn.Parameter(torch.randn(lin.out_features, num_experts * r) * 0.01)

    def proj(self, name: str, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        z = x @ self.A[name].t()  # (T, E*r): all experts at once
        z = (z.view(-1, self.E, self.r) * p[:, :, None]).view(z.shape)
        return getattr(self.mlp, name)(x) + z @ self.B[name].t() * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.router(x).softmax(-1)  # (T, E)
        return self.proj("down_proj", self.mlp.act_fn(self.proj("gate_proj", x, p)) * self.proj("up_proj", x, p), p)


def wrap(mlp: MLP, make) -> MLP:
    for name in ("gate_proj", "up_proj", "down_proj"):
        setattr(mlp, name, make(getattr(mlp, name)))
    return mlp


def peft_lora(base: nn.Linear, r: int, alpha: float) -> PeftLoraLinear:
    return PeftLoraLinear(base, "default", LoraConfig(r=r, lora_alpha=alpha), r=r, lora_alpha=alpha)


class PeakMemory(TorchDispatchMode):
    """Peak bytes of CPU tensors created while active (freed storages are subtracted)."""

    def __enter__(self):
        self.live: dict[int, int] = {}
        self.cur = self.peak = 0
        return super().__enter__()

    def _free(self, key: int) -> None:
        self.cur -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.cur += storage.nbytes()
                    self.peak = max(self.peak, self.cur)
                    weakref.finalize(storage, self._free, key)
        return out


def step_fn(module: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    def step() -> None:
        module.zero_grad(set_to_none=True)
        module(x).backward(grad)

    return step


def measure(fns: dict, reps: int, warmup: int) -> dict[str, tuple[float, float]]:
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(reps):
        for n, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[n].append(time.perf_counter() - t0)
    peaks = {}
    for n, fn in fns.items():
        with PeakMemory() as pm:
            fn()
        peaks[n] = pm.peak / 2**20
    return {n: (statistics.median(times[n]) * 1e3, min(times[n]) * 1e3, peaks[n]) for n in fns}


def check_lora_parity(ours: MLP, peft: MLP, x: torch.Tensor) -> None:
    """Ours and peft's LoRA, given the same (non-zero) A and B on the same base, compute the same MLP:
    the timings compare equal work."""
    with torch.no_grad():
        for name in ("gate_proj", "up_proj", "down_proj"):
            mine, theirs = getattr(ours, name), getattr(peft, name)
            nn.init.normal_(mine.lora_B.weight, std=0.01)
            theirs.lora_A["default"].weight.copy_(mine.lora_A.weight)
            theirs.lora_B["default"].weight.copy_(mine.lora_B.weight)
        torch.testing.assert_close(ours(x), peft(x), rtol=1e-4, atol=1e-5)
    print("parity: ok (our LoRA = peft's LoRA on the same weights)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions, for a smoke run")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--inter", type=int, default=1376)
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--r", type=int, default=32)
    args = parser.parse_args()
    T, H, I, E, r = args.tokens, args.hidden, args.inter, args.experts, args.r
    reps, warmup = (3, 1) if args.quick else (15, 3)
    if args.quick:  # a smoke run: small enough for the test suite
        T, H, I = min(T, 256), min(H, 64), min(I, 160)
    torch.manual_seed(0)
    base = MLP(H, I)
    fresh = lambda: MLP(H, I).requires_grad_(False)  # noqa: E731

    def same_base(m: MLP) -> MLP:
        m.load_state_dict(base.state_dict())
        return m

    mole = MoLEMLP(same_base(fresh()), E, r, 2 * r)
    for b in mole.lora_B.values():
        nn.init.normal_(b, std=0.01)
    nn.init.normal_(mole.router.proj.weight, std=0.5)  # spread tokens over experts
    R = 4 * r  # MoRA total rank, and the LoRA of the same total rank
    modules = {
        f"LoRA r={r} (ours)": wrap(same_base(fresh()), lambda lin: LoRALinear(lin, r, 2 * r)),
        f"LoRA r={r} (peft)": wrap(same_base(fresh()), lambda lin: peft_lora(lin, r, 2 * r)),
        f"MoLE {E}x r={r}, top-1": mole,
        f"dense mixture {E}x r={r}": DenseLoRAMixture(same_base(fresh()), E, r, 2 * r),
        f"LoRA r={R}": wrap(same_base(fresh()), lambda lin: LoRALinear(lin, R, 2 * R)),
        f"MoRA R={R}, all ranks": wrap(same_base(fresh()), lambda lin: MoRALinear(lin, R, 2 * R)),
        f"MoRA R={R}, top-{R // 4}": wrap(same_base(fresh()), lambda lin: MoRALinear(lin, R, 2 * R, top_k=R // 4)),
    }
    x = torch.randn(T, H, requires_grad=False)
    grad = torch.randn(T, H)
    check_lora_parity(modules[f"LoRA r={r} (ours)"], modules[f"LoRA r={r} (peft)"], x)
    results = measure({n: step_fn(m, x, grad) for n, m in modules.items()}, reps, warmup)
    tokens_per_expert = torch.bincount(mole.last_routing.indices[:, 0], minlength=E).tolist()

    print(f"## LoRA experts on one MLP, forward+backward, {datetime.date.today().isoformat()}")
    print()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}; "
        f"tokens={T}, hidden={H}, intermediate={I}, base frozen; MoLE tokens per expert {tokens_per_expert}"
    )
    print()
    ref_name = f"LoRA r={r} (ours)"
    big_ref = f"LoRA r={R}"
    print("Times: median over repetitions (ms), in brackets the fastest repetition; ratios from medians.")
    print()
    print("| adapter | ms | peak MiB | time vs LoRA r | time vs LoRA of same total rank |")
    print("|---|---:|---:|---:|---:|")
    for n, (ms, best, mib) in results.items():
        vs_r = ms / results[ref_name][0]
        vs_big = f"{ms / results[big_ref][0]:.2f}" if n.startswith("MoRA") or n == big_ref else ""
        print(f"| {n} | {ms:.2f} ({best:.2f}) | {mib:.1f} | {vs_r:.2f} | {vs_big} |")
    mole_name = f"MoLE {E}x r={r}, top-1"
    ratio = results[mole_name][0] / results[ref_name][0]
    ratio_min = results[mole_name][1] / results[ref_name][1]
    print()
    print(f"MoLE / plain LoRA: {ratio:.2f} ({ratio_min:.2f}) (goal <= 1.25: {'yes' if ratio <= 1.25 else 'no'})")

if __name__ == "__main__":
    main()

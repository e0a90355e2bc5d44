"""Training step time of MoLE against plain LoRA of the same rank, on the whole multimodal model.

    python benchmarks/mole_step.py [--rank 1] [--steps 30] [--threads 1] [--quick] [--out DIR]

The conflict experiment times its runs one after another, so on a shared machine a run that
happens to meet other jobs looks slower. Here the methods (`LoRATuning`, `MoLE` with 2 and 3
experts) step in turns, interleaved, in one process, on the same batches of the shipped data
(batch 64, all domains), each step = forward + backward + AdamW; the medians and their ratios
to plain LoRA are printed as a markdown table with the date and the machine. Before timing, a parity
check: built from one seed, every method starts from the same base weights with its adapters' B at
zero, so all compute the same first loss (they time the same model, not three different ones).
`--out DIR` also writes DIR/results.json (medians, ratios, and the commit the run started from); the
conflict experiment (lightning_moe/experiments/conflict.py) takes MoLE's cost from it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
from lightning_moe.data import DomainMixtureDataModule  # noqa: E402
from lightning_moe.provenance import git_state, provenance_words  # noqa: E402
from lightning_moe.methods import BackboneConfig, ExpertOptions, LoRAOptions, LoRATuning, MoLE  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per method (after 3 warm-up steps)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 timed steps of batch 8")
    parser.add_argument("--out", type=Path, default=None, help="also write results.json here")
    args = parser.parse_args()
    provenance = git_state()  # when the run starts
    if args.quick:
        args.steps, args.batch_size = 2, 8
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = str(ROOT / "data/tokenizer")
    # --quick: the first samples of each domain, enough for the 8 batches (setting up all of them takes seconds)
    smoke = dict(max_train_samples_per_domain=8 * args.batch_size, max_eval_samples_per_domain=1) if args.quick else {}
    data = DomainMixtureDataModule(root=str(ROOT / "data/shapes"), tokenizer=tokenizer, batch_size=args.batch_size,
                                   **smoke)
    data.setup("fit")
    batches = [b for _, b in zip(range(8), data.train_dataloader())]
    # the tiny preset of the experiment's base (configs/mole/base.yaml)
    backbone = BackboneConfig(encoders={"image": {"tower": "tiny-clip", "feature_layer": -1}})
    lora = LoRAOptions(r=args.rank, alpha=2.0 * args.rank)
    torch.manual_seed(0)  # every method's base from the same seed: the parity check below
    methods = {"LoRA": LoRATuning(lora=lora, tokenizer=tokenizer, backbone=backbone)}
    for experts in (2, 3):
        torch.manual_seed(0)
        methods[f"MoLE {experts} experts"] = MoLE(lora=lora, experts=ExpertOptions(num_experts=experts),
                                                 tokenizer=tokenizer, backbone=backbone)
    with torch.no_grad():
        first = {n: m.compute_loss(batches[0]).logs["lm_loss"] for n, m in methods.items()}
    for name, loss in first.items():
        torch.testing.assert_close(loss, first["LoRA"], rtol=1e-5, atol=1e-6, msg=f"{name}'s first loss")
    print("parity: ok (every method's first LM loss equals plain LoRA's: same base, adapters at zero)")
    optimizers = {n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
                  for n, m in methods.items()}
    times: dict[str, list[float]] = {n: [] for n in methods}
    for step in range(args.steps + 3):
        batch = batches[step % len(batches)]
        for name, method in methods.items():  # interleaved: every method meets the same machine load
            start = time.perf_counter()
            method.compute_loss(batch).loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            if step >= 3:
                times[name].append(time.perf_counter() - start)
    reference = statistics.median(times["LoRA"])
    stamp = (f"{datetime.date.today()}, {platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}, "
             f"{provenance_words(provenance)}")
    print(f"{stamp}, rank {args.rank}, batch {args.batch_size}, {args.steps} interleaved steps each\n")
    print("| method | trainable params | median step ms | / LoRA |\n|---|---|---|---|")
    for name, method in methods.items():
        median = statistics.median(times[name])
        params = sum(p.numel() for p in method.parameters() if p.requires_grad)
        print(f"| {name} | {params:,} | {1000 * median:.0f} | {median / reference:.2f} |")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        medians = {name: statistics.median(t) for name, t in times.items()}
        (args.out / "results.json").write_text(json.dumps({
            "stamp": stamp, **provenance, "rank": args.rank, "batch_size": args.batch_size, "steps": args.steps,
            "median_step_s": medians, "ratios": {name: m / reference for name, m in medians.items()}}, indent=1))


if __name__ == "__main__":
    main()

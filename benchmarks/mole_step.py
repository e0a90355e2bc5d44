"""Training step time of MoLE against plain LoRA of the same rank, on the whole multimodal model.

    python benchmarks/mole_step.py [--rank 1] [--steps 30] [--threads 1]

The conflict experiment times its runs one after another, so on a shared machine a run that
happens to meet other jobs looks slower. Here the methods (`LoRATuning`, `MoLE` with 2 and 3
experts) step in turns, interleaved, in one process, on the same batches of the shipped data
(batch 64, all domains), each step = forward + backward + AdamW; the medians and their ratios
to plain LoRA are printed as a markdown table with the date and the machine.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
from lightning_moe.data import DomainMixtureDataModule  # noqa: E402
from lightning_moe.methods import BackboneConfig, ExpertOptions, LoRAOptions, LoRATuning, MoLE  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per method (after 3 warm-up steps)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = str(ROOT / "data/tokenizer")
    data = DomainMixtureDataModule(root=str(ROOT / "data/shapes"), tokenizer=tokenizer, batch_size=64)
    data.setup("fit")
    batches = [b for _, b in zip(range(8), data.train_dataloader())]
    backbone = BackboneConfig(vision_feature_layer=-1)  # the tiny preset the experiment's base uses
    lora = LoRAOptions(r=args.rank, alpha=2.0 * args.rank)
    methods = {"LoRA": LoRATuning(lora=lora, tokenizer=tokenizer, backbone=backbone)}
    for experts in (2, 3):
        methods[f"MoLE {experts} experts"] = MoLE(lora=lora, experts=ExpertOptions(num_experts=experts),
                                                 tokenizer=tokenizer, backbone=backbone)
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
    print(f"{datetime.date.today()}, {platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"rank {args.rank}, batch 64, {args.steps} interleaved steps each\n")
    print("| method | trainable params | median step ms | / LoRA |\n|---|---|---|---|")
    for name, method in methods.items():
        median = statistics.median(times[name])
        params = sum(p.numel() for p in method.parameters() if p.requires_grad)
        print(f"| {name} | {params:,} | {1000 * median:.0f} | {median / reference:.2f} |")


if __name__ == "__main__":
    main()

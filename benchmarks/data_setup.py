"""What decoding every image at setup costs: `DomainMixtureDataModule.setup("fit")` on the shipped data.

    python benchmarks/data_setup.py [--root data/shapes] [--rounds 3]

Two configurations, interleaved over `--rounds` rounds in this process, the median of each:

- decode (the default): every train and validation image decoded in full (`media.py`), so a
  truncated or corrupt file is caught before training;
- deferred (`defer_train_decoding: true`): train images only checked for existence and place,
  decoded when a batch draws them (validation images are still decoded).

Both read, validate and tokenize every record; the ratio is what full decoding adds. Prints a
markdown table with the date, the machine's CPU count and torch's thread count.
"""

import argparse
import datetime
import os
import platform
import statistics
import time

import torch

from lightning_moe.data import DomainMixtureDataModule

CONFIGS = {"decode": False, "deferred": True}  # name -> defer_train_decoding


def time_setup(root: str, defer: bool) -> tuple[float, int, int]:
    """Seconds of setup("fit"), samples kept, images decoded at setup."""
    dm = DomainMixtureDataModule(root=root, defer_train_decoding=defer)
    start = time.perf_counter()
    dm.setup("fit")
    seconds = time.perf_counter() - start
    datasets = [d for split in dm.datasets.values() for d in split.values()]
    decoded = sum(len(s.media.get("image", [])) for d in datasets if d.decode_media for s in d.samples)
    return seconds, sum(len(d) for d in datasets), decoded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="data/shapes")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    times: dict[str, list[float]] = {name: [] for name in CONFIGS}
    counts: dict[str, tuple[int, int]] = {}
    time_setup(args.root, True)  # warm-up: imports, tokenizer files and the page cache
    for _ in range(args.rounds):
        for name, defer in CONFIGS.items():
            seconds, samples, decoded = time_setup(args.root, defer)
            times[name].append(seconds)
            counts[name] = (samples, decoded)

    reference = statistics.median(times["deferred"])
    print(f"{datetime.date.today()} · {platform.machine()}, {os.cpu_count()} CPUs · torch threads "
          f"{torch.get_num_threads()} · median of {args.rounds} rounds · root {args.root}\n")
    print("| setup | samples | images decoded at setup | seconds | vs deferred |")
    print("|---|---|---|---|---|")
    for name in CONFIGS:
        median = statistics.median(times[name])
        samples, decoded = counts[name]
        print(f"| {name} | {samples} | {decoded} | {median:.2f} | {median / reference:.2f}x |")


if __name__ == "__main__":
    main()

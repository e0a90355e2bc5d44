"""Step time and peak memory of a training run, for TensorBoard and for experiment tables.

Step time is the wall time from a training batch's start to its end (forward, backward, optimizer
step; data loading excluded), logged per step as `train/step_time_ms` and summarised by the median
after a few warm-up steps (the median, since on a shared machine a few steps are slowed by other
processes). Peak memory is
`torch.cuda.max_memory_allocated` on a GPU; on CPU it is the process's peak resident set size
(Linux `VmHWM`, reset at the start of training through `/proc/self/clear_refs`), so it includes
the Python process, the libraries and the data, not only tensors.
"""

from __future__ import annotations

import re
import statistics
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

_STATUS = Path("/proc/self/status")


def _peak_rss_mb() -> float | None:
    if not _STATUS.is_file():
        return None
    match = re.search(r"VmHWM:\s+(\d+) kB", _STATUS.read_text())
    return int(match.group(1)) / 1024 if match else None


def _reset_peak_rss() -> None:
    # "5" resets the peak RSS to the current RSS (Linux >= 4.0); without it the peak is the process's so far
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError as e:
        rank_zero_info(f"StageProfile: cannot reset the peak RSS ({e}); the peak is the process's so far")


class StageProfile(L.Callback):
    def __init__(self, warmup_steps: int = 2):
        """warmup_steps: first steps left out of the median step time (allocations, lazy init)."""
        self.warmup_steps = warmup_steps
        self.step_times: list[float] = []
        self.step_time_s: float | None = None  # median over the steps after warm-up
        self.peak_memory_mb: float | None = None
        self.memory_kind = "cpu_peak_rss"
        self._start = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self.step_times = []
        if pl_module.device.type == "cuda":
            self.memory_kind = "cuda_max_allocated"
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        else:
            _reset_peak_rss()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        seconds = time.perf_counter() - self._start
        self.step_times.append(seconds)
        pl_module.log("train/step_time_ms", 1000 * seconds, on_step=True, on_epoch=False)

    def on_train_end(self, trainer, pl_module) -> None:
        times = self.step_times[self.warmup_steps:] or self.step_times
        self.step_time_s = statistics.median(times) if times else None
        if self.memory_kind == "cuda_max_allocated":
            self.peak_memory_mb = torch.cuda.max_memory_allocated(pl_module.device) / 2**20
        else:
            self.peak_memory_mb = _peak_rss_mb()
        writer = getattr(trainer.logger, "experiment", None)
        if writer is not None and hasattr(writer, "add_scalar"):
            if self.step_time_s is not None:
                writer.add_scalar("perf/step_time_s", self.step_time_s, trainer.global_step)
            if self.peak_memory_mb is not None:
                writer.add_scalar(f"perf/{self.memory_kind}_mb", self.peak_memory_mb, trainer.global_step)
        rank_zero_info(f"StageProfile: median step {self.step_time_s} s over {len(times)} steps, "
                       f"peak memory ({self.memory_kind}) {self.peak_memory_mb} MB")

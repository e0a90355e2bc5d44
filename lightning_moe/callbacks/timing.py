"""Training step time: wall-clock seconds of each training batch (forward, backward, optimizer
step), logged to TensorBoard as `train/step_time_ms`, summarised as a median after a warm-up.

The median, not the mean: on a shared machine a few steps are slowed by other processes, and
the median of many steps is what comparisons between methods in one run should use.
"""

from __future__ import annotations

import statistics
import time

import lightning as L


class StepTimer(L.Callback):
    def __init__(self, warmup_steps: int = 5):
        """warmup_steps: first steps left out of the summary (allocator and kernel warm-up)."""
        self.warmup_steps = warmup_steps
        self.times: list[float] = []  # seconds per training batch, in order
        self._start: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._start is None:
            return
        seconds = time.perf_counter() - self._start
        self.times.append(seconds)
        pl_module.log("train/step_time_ms", 1000 * seconds, on_step=True, on_epoch=False)

    def median_ms(self) -> float | None:
        """Median step time in milliseconds after the warm-up (all steps if there are fewer)."""
        timed = self.times[self.warmup_steps:] or self.times
        return 1000 * statistics.median(timed) if timed else None

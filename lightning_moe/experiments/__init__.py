"""Experiments: one file per question a paper asks, run through the CLI's classes
(`python -m lightning_moe.experiments.<name> --out DIR [--quick]`). Shared helpers live here:
`working_directory` (run inside the output directory) and `fit_and_test` (one CLI `fit`, then
`test` with the same trainer and model, summarised as a `RunResult`)."""

from __future__ import annotations

import gc
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..callbacks import StageProfile
from ..cli import main as cli_main
from ..models import parameter_counts


@contextmanager
def working_directory(path: Path) -> Iterator[None]:
    """Run inside `path` (the configs' relative `runs/...` outputs land there; `contextlib.chdir` is
    Python 3.11+). Also hides the script's own argv from LightningCLI, which warns when it gets both."""
    previous, argv = Path.cwd(), sys.argv
    os.chdir(path)
    sys.argv = argv[:1]
    try:
        yield
    finally:
        os.chdir(previous)
        sys.argv = argv


@dataclass
class RunResult:
    """One trained and tested run: what it was, what it cost, what it scored."""

    name: str
    method: str  # the LightningModule's class name
    stage: str  # its stage ("" for methods without stages)
    steps: int  # optimizer steps taken
    wall_s: float  # fit + test, data setup included
    step_time_s: float | None  # median training step after warm-up (StageProfile)
    peak_memory_mb: float | None
    memory_kind: str  # cpu_peak_rss (whole process) | cuda_max_allocated
    params_total: int
    params_activated: int  # parameters one token uses (top-k of E experts count k/E)
    metrics: dict[str, float] = field(default_factory=dict)  # test/<domain>/<metric>, test/exact_match
    params_trainable: int | None = None  # None in rows written before this field existed


def fit_and_test(name: str, args: list[str]) -> RunResult:
    """`lightning_moe.cli.main(["fit", *args])` (config files and overrides), then `test` with the same
    trainer, model and data module. The run needs a `StageProfile` callback for its step time and memory."""
    start = time.perf_counter()
    cli = cli_main(["fit", *args])
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    profile = next((cb for cb in cli.trainer.callbacks if isinstance(cb, StageProfile)), StageProfile())
    counts = parameter_counts(cli.model.model)
    result = RunResult(
        name=name, method=type(cli.model).__name__, stage=str(getattr(cli.model, "stage", "") or ""),
        steps=cli.trainer.global_step, wall_s=time.perf_counter() - start, step_time_s=profile.step_time_s,
        peak_memory_mb=profile.peak_memory_mb, memory_kind=profile.memory_kind, params_total=counts.total,
        params_activated=counts.activated,
        metrics={k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("test/")},
        params_trainable=sum(p.numel() for p in cli.model.parameters() if p.requires_grad),
    )
    del cli
    gc.collect()  # the next run's peak memory should not hold this one's model
    return result

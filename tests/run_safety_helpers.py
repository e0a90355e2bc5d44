"""Test-only callbacks for tests/test_run_safety.py, named on the command line of a subprocess run
(`--trainer.callbacks+=tests.run_safety_helpers.KillAtStep`): a crash, a NaN, a kill mid-save and a disk
that fills up mid-save."""

from __future__ import annotations

import errno
import os
import signal

import lightning as L
import torch


class KillAtStep(L.Callback):
    """SIGKILL this process when batch `step` starts (after the checkpoints of step `step` were written)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class PoisonBatch(L.Callback):
    """Fill the images of the batch at `step` with NaN (so every loss term is NaN) and print its sample ids."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            batch["pixel_values"].fill_(float("nan"))
            print("POISONED", " ".join(batch["id"]), flush=True)


class KillDuringSave(L.Callback):
    """SIGKILL this process half-way through writing its `nth` checkpoint file (counted from 1)."""

    def __init__(self, nth: int):
        from lightning_moe.callbacks import checkpoint_io

        write_all, calls = checkpoint_io._write_all, [0]

        def dying_write(fd, data):
            calls[0] += 1
            if calls[0] == nth:
                write_all(fd, data[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
            write_all(fd, data)

        checkpoint_io._write_all = dying_write


class DiskFullDuringSave(L.Callback):
    """The disk fills up half-way through writing the `nth` checkpoint file (counted from 1): that write raises
    OSError(ENOSPC), as `os.write` does on a full disk."""

    def __init__(self, nth: int):
        from lightning_moe.callbacks import checkpoint_io

        write_all, calls = checkpoint_io._write_all, [0]

        def filling_write(fd, data):
            calls[0] += 1
            if calls[0] == nth:
                write_all(fd, data[: len(data) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            write_all(fd, data)

        checkpoint_io._write_all = filling_write


def trainable_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

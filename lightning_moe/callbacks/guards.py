"""`NonFiniteGuard`: a NaN or inf loss or gradient never reaches the weights or a checkpoint.

It runs after backward and before the optimizer step (`on_before_optimizer_step`, after DDP's
gradient all-reduce and before clipping). On a non-finite loss term or gradient it either stops the
run (`action: stop`, the default) with a `NonFiniteError` naming the step, the loss terms and the
batch's sample ids and domains, or drops that step's gradients (`action: skip`) and counts it. The
optimizer step never runs on such gradients, so every checkpoint written before the stop is intact,
and `on_save_checkpoint` refuses to write weights that are non-finite however they got there.

The CLI adds this guard to every run (lightning_moe/cli.py); a config that lists its own
`NonFiniteGuard` under `trainer.callbacks` replaces it (for example with `action: skip`).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn


class NonFiniteError(RuntimeError):
    """Training produced a NaN / inf loss, gradient or weight; the message says where."""


def _short(values: list[Any], limit: int = 16) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return f"[{shown}{f', ... ({len(values)} in all)' if len(values) > limit else ''}]"


class NonFiniteGuard(L.Callback):
    """Stop (or skip the step) on a non-finite loss or gradient; never checkpoint non-finite weights.

    Args:
        action: `stop` raises `NonFiniteError`; `skip` drops the step's gradients, counts it
            (logged as `train/nonfinite_skipped`) and goes on.
        max_skipped: with `skip`, stop anyway after this many skipped steps (None: no limit).
    """

    def __init__(self, action: Literal["stop", "skip"] = "stop", max_skipped: int | None = 10):
        if action not in ("stop", "skip"):
            raise ValueError(f"NonFiniteGuard action must be 'stop' or 'skip', got {action!r}")
        self.action, self.max_skipped = action, max_skipped
        self.skipped = 0
        self._samples: list[tuple[str, str]] = []  # (id, domain) of the micro-batches since the last step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if isinstance(batch, dict):
            ids = batch.get("id", [])
            domains = batch.get("domain", ["?"] * len(ids))
            self._samples.extend(zip(map(str, ids), map(str, domains)))

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        samples, self._samples = self._samples, []
        terms = {k: float(v) for k, v in trainer.callback_metrics.items()
                 if k.startswith("train/") and torch.is_tensor(v) and v.numel() == 1}
        bad_terms = sorted(k for k, v in terms.items() if not math.isfinite(v))
        named_grads = [(n, p.grad) for n, p in pl_module.named_parameters() if p.grad is not None]
        finite = torch.stack([torch.isfinite(g).all() for _, g in named_grads]) if named_grads else torch.ones(0, dtype=torch.bool)
        if not bad_terms and bool(finite.all()):
            return
        bad_grads = [n for (n, _), ok in zip(named_grads, finite.tolist()) if not ok]
        message = (
            f"non-finite training step at global step {trainer.global_step} (epoch {trainer.current_epoch}): "
            f"loss terms {', '.join(f'{k}={v:.6g}' for k, v in sorted(terms.items())) or '(none logged)'}"
            f"{f' (non-finite: {bad_terms})' if bad_terms else ''}; "
            f"{len(bad_grads)} parameters with non-finite gradients{f' (e.g. {bad_grads[0]})' if bad_grads else ''}; "
            f"batch sample ids {_short([i for i, _ in samples])}, domains {_short(sorted({d for _, d in samples}))}"
        )
        if self.action == "skip" and (self.max_skipped is None or self.skipped < self.max_skipped):
            self.skipped += 1
            for p in pl_module.parameters():
                p.grad = None  # the optimizer leaves parameters without gradients untouched
            pl_module.log("train/nonfinite_skipped", float(self.skipped))
            rank_zero_warn(f"{message}. Step skipped ({self.skipped} so far).")
            return
        raise NonFiniteError(
            f"{message}. Training stopped before the optimizer step: the weights are still finite and the last "
            "checkpoint written is untouched. Lower the learning rate, check these samples, or configure "
            "lightning_moe.callbacks.NonFiniteGuard with action: skip."
        )

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        bad = [k for k, v in checkpoint.get("state_dict", {}).items()
               if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise NonFiniteError(
                f"refusing to write a checkpoint at global step {trainer.global_step}: {len(bad)} tensors hold NaN/inf "
                f"(e.g. {bad[0]}); the checkpoints already written are untouched"
            )

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))

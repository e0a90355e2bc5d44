"""Print the final per-domain metrics as a table at the end of fit / validate / test."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_info


def metrics_table(metrics: dict[str, float], stage: str) -> str:
    """Rows = domains (+ "all"), columns = metric names, from keys like "val/<domain>/<metric>"."""
    rows: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if parts[0] != stage or len(parts) not in (2, 3):
            continue
        domain, metric = (parts[1], parts[2]) if len(parts) == 3 else ("all", parts[1])
        rows.setdefault(domain, {})[metric] = float(value)
    columns = sorted({m for r in rows.values() for m in r})
    lines = ["| domain | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for domain in sorted(rows, key=lambda d: (d == "all", d)):
        lines.append(f"| {domain} | " + " | ".join(f"{rows[domain][c]:.4f}" if c in rows[domain] else "" for c in columns) + " |")
    return "\n".join(lines)


class MetricsSummary(L.Callback):
    def _print(self, trainer: L.Trainer, stage: str) -> None:
        metrics = {k: v.item() for k, v in trainer.callback_metrics.items() if k.startswith(f"{stage}/")}
        if metrics:
            rank_zero_info(f"\nFinal {stage} metrics (step {trainer.global_step}):\n{metrics_table(metrics, stage)}\n")

    def on_fit_end(self, trainer, pl_module) -> None:
        self._print(trainer, "val")

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "validate":
            self._print(trainer, "val")

    def on_test_end(self, trainer, pl_module) -> None:
        self._print(trainer, "test")

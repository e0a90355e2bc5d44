"""Continual-learning metrics from the accuracy matrix (the MTIL-style protocol MoRA is evaluated with).

`acc[i, j]` is the accuracy on task j after training task i (T tasks, rows = training progress).

- Last: mean of the final row, `mean_j acc[T-1, j]` (what the final model knows).
- Avg: mean of the whole matrix (accuracy averaged over the whole training trajectory).
- Transfer: mean of the strict upper triangle, `acc[i, j]` with j > i: zero-shot accuracy on
  tasks not trained yet (the mean of those entries, not a mean of per-task means).
- BWT (backward transfer, Lopez-Paz & Ranzato 2017): `mean_{j<T-1} (acc[T-1, j] - acc[j, j])`;
  negative = forgetting.
- Forgetting (Chaudhry et al. 2018): `mean_{j<T-1} (max_{i<T-1} acc[i, j] - acc[T-1, j])`;
  positive = forgetting, measured from the best accuracy a task ever had.

`AccuracyMatrix` is a torchmetrics `Metric` filled one row (one training stage) at a time; rows not
filled yet are NaN, and `compute()` evaluates the metrics on the rows filled so far, so the values
can be logged after every task. Transfer needs two rows, BWT / forgetting two rows; otherwise NaN.
`accuracy_table` writes the matrix as a markdown table (TensorBoard text, experiment results).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torchmetrics import Metric


@dataclass
class ContinualScores:
    last: float
    avg: float
    transfer: float
    bwt: float
    forgetting: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def continual_scores(acc: torch.Tensor) -> ContinualScores:
    """Last / Avg / Transfer / BWT / forgetting of a (rows, T) accuracy matrix (rows <= T trained so far)."""
    if acc.ndim != 2 or acc.shape[0] == 0 or acc.shape[0] > acc.shape[1]:
        raise ValueError(f"expected a (rows, tasks) accuracy matrix with 1 <= rows <= tasks, got shape {tuple(acc.shape)}")
    acc = acc.double()
    if torch.isnan(acc).any():
        raise ValueError(f"the accuracy matrix has missing entries:\n{acc}")
    rows, tasks = acc.shape
    nan = float("nan")
    upper = torch.triu(torch.ones(rows, tasks, dtype=torch.bool), diagonal=1)
    last = acc[-1]
    earlier = torch.arange(rows - 1)  # tasks trained before the last trained one
    if rows > 1:
        bwt = (last[earlier] - acc[earlier, earlier]).mean().item()
        forgetting = (acc[:-1, : rows - 1].max(dim=0).values - last[: rows - 1]).mean().item()
    else:
        bwt = forgetting = nan
    return ContinualScores(
        last=last.mean().item(),
        avg=acc.mean().item(),
        transfer=acc[upper].mean().item() if upper.any() else nan,
        bwt=bwt,
        forgetting=forgetting,
    )


def accuracy_table(matrix: torch.Tensor | list[list[float]], task_names: list[str]) -> str:
    """Markdown table: rows = after training task i, columns = accuracy on task j."""
    header = "| after \\ on | " + " | ".join(task_names) + " |"
    separator = "|---" * (len(task_names) + 1) + "|"
    rows = [f"| {task_names[i]} | " + " | ".join(f"{v:.3f}" for v in row) + " |"
            for i, row in enumerate(torch.as_tensor(matrix).tolist())]
    return "\n".join([header, separator, *rows])


class AccuracyMatrix(Metric):
    """acc[i, j], filled with `update(i, row)` after training task i; `compute()` -> the scores dict."""

    full_state_update = False

    def __init__(self, num_tasks: int, **kwargs):
        super().__init__(**kwargs)
        if num_tasks <= 0:
            raise ValueError(f"num_tasks must be positive, got {num_tasks}")
        self.num_tasks = num_tasks
        # no reduction: the rows written are already reduced over processes (per-task exact match)
        self.add_state("acc", default=torch.full((num_tasks, num_tasks), float("nan")), dist_reduce_fx=None)

    def update(self, task: int, row: torch.Tensor) -> None:
        """row (T,): accuracy on every task after training task `task`."""
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"task index {task} out of range for {self.num_tasks} tasks")
        row = torch.as_tensor(row, dtype=self.acc.dtype, device=self.acc.device)
        if row.shape != (self.num_tasks,):
            raise ValueError(f"expected one accuracy per task ({self.num_tasks}), got shape {tuple(row.shape)}")
        self.acc[task] = row

    @property
    def filled_rows(self) -> int:
        """Rows 0..n-1 that are complete (the stages trained and evaluated so far)."""
        complete = ~torch.isnan(self.acc).any(dim=1)
        n = 0
        while n < self.num_tasks and complete[n]:
            n += 1
        return n

    def matrix(self) -> torch.Tensor:
        return self.acc[: self.filled_rows].clone()

    def compute(self) -> dict[str, torch.Tensor]:
        if self.filled_rows == 0:
            raise ValueError("no row of the accuracy matrix is filled yet")
        scores = continual_scores(self.matrix())
        return {k: torch.tensor(v) for k, v in scores.as_dict().items()}

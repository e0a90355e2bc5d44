"""Figures a person can read: the domain x expert routing heat map, the continual accuracy matrix and
the expert-load bar chart, drawn with matplotlib.

One module for every picture of the project: the TensorBoard callbacks (`callbacks/routing.py`,
`callbacks/continual.py`) log these figures as images, and the experiments' reports and the PNGs
under `docs/` draw them from the same functions. It takes plain numbers (nested lists, numpy or torch
arrays) and imports neither Lightning nor torch, so a report can draw from a `results.json` alone.

Figures are built on matplotlib's object API with the Agg canvas, never through `pyplot`: no global
figure state, no GUI backend chosen behind a notebook's back, and nothing to close.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 100
# one colour map for every heat map, perceptually uniform and readable in grey
CMAP = "viridis"


def _array(values: Any) -> np.ndarray:
    """Nested lists, numpy or torch (on any device) -> a float64 numpy array."""
    if hasattr(values, "detach"):  # a torch tensor, without importing torch here
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64)


def heatmap(matrix: Any, row_labels: Sequence[str], col_labels: Sequence[str], *, title: str, xlabel: str,
            ylabel: str, colorbar_label: str, vmin: float = 0.0, vmax: float = 1.0, fmt: str = "{:.2f}") -> Figure:
    """A labelled heat map: one row per `row_labels`, one column per `col_labels`, the value written in
    every cell and a colour bar. NaN cells (e.g. tasks not trained yet) are left blank."""
    values = _array(matrix)
    if values.ndim != 2 or values.shape != (len(row_labels), len(col_labels)):
        raise ValueError(f"heat map '{title}': matrix of shape {values.shape} for {len(row_labels)} row labels "
                         f"and {len(col_labels)} column labels")
    rows, cols = values.shape
    # about 0.7 inch per column / 0.45 per row plus room for labels and the colour bar: >= 400 px wide
    longest = max((len(str(label)) for label in row_labels), default=1)
    figure = Figure(figsize=(max(4.0, 0.7 * cols + 0.09 * longest + 2.2), max(2.6, 0.45 * rows + 1.6)), dpi=DPI)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(values), cmap=CMAP, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(cols), [str(label) for label in col_labels])
    ax.set_yticks(range(rows), [str(label) for label in row_labels])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    middle = (vmin + vmax) / 2
    small = cols > 12  # many experts: smaller numbers so that they stay inside their cells
    for i in range(rows):
        for j in range(cols):
            value = values[i, j]
            if math.isfinite(value):  # dark text on the bright half of viridis, white on the dark half
                ax.text(j, i, fmt.format(value), ha="center", va="center", fontsize=6 if small else 9,
                        color="black" if value > middle else "white")
    figure.colorbar(image, ax=ax, label=colorbar_label)
    figure.tight_layout()
    return figure


def routing_heatmap(share: Any, domains: Sequence[str], layer: str, stage: str = "") -> Figure:
    """Domain x expert routing of one routed layer: `share[d, e]` = the fraction of domain d's routed
    token slots that went to expert e (each row sums to 1)."""
    values = _array(share)
    experts = [str(e) for e in range(values.shape[-1])] if values.ndim == 2 else []
    where = f" ({stage})" if stage else ""
    return heatmap(values, list(domains), experts, title=f"{layer}: share of each domain's tokens per expert{where}",
                   xlabel="expert", ylabel="domain", colorbar_label="share of routed token slots")


def accuracy_matrix(accuracy: Any, tasks: Sequence[str]) -> Figure:
    """The continual accuracy matrix acc[i, j] (accuracy on task j after training task i), with task names
    on both axes; rows not trained yet may be NaN (blank) or left out."""
    values = _array(accuracy)
    if values.ndim == 2 and values.shape[0] < len(tasks):  # rows of tasks not trained yet: blank
        values = np.vstack([values, np.full((len(tasks) - values.shape[0], values.shape[1]), np.nan)])
    return heatmap(values, [f"after {t}" for t in tasks], list(tasks), title="continual accuracy acc[i, j]",
                   xlabel="evaluated on task j", ylabel="after training task i", colorbar_label="accuracy",
                   fmt="{:.3f}")


def expert_load(counts: Any, layer: str, stage: str = "") -> Figure:
    """Share of one layer's routed token slots per expert, as bars, with the uniform share 1/E dashed."""
    values = _array(counts).reshape(-1)
    if values.size == 0:
        raise ValueError(f"expert load of {layer}: no experts")
    share = values / max(values.sum(), 1e-12)
    figure = Figure(figsize=(max(5.0, 0.45 * values.size + 1.6), 3.0), dpi=DPI)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    ax.bar(range(values.size), share, color="#3b528b")
    ax.axhline(1 / values.size, color="grey", linestyle="--", linewidth=1, label=f"uniform (1/{values.size})")
    ax.set_xticks(range(values.size), [str(e) for e in range(values.size)])
    ax.set_xlabel("expert")
    ax.set_ylabel("share of routed slots")
    where = f" ({stage})" if stage else ""
    ax.set_title(f"{layer}: expert load{where}, max/mean {share.max() * values.size:.2f}", fontsize=10)
    ax.set_ylim(0, max(share.max(), 1 / values.size) * 1.3)  # room above the bars for the legend
    ax.legend(loc="upper right", fontsize=8)
    figure.tight_layout()
    return figure


def to_image(figure: Figure) -> np.ndarray:
    """The rendered figure as an (H, W, 3) uint8 array (TensorBoard's `add_image(..., dataformats="HWC")`)."""
    canvas = figure.canvas if isinstance(figure.canvas, FigureCanvasAgg) else FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_png(figure: Figure, path: str | Path) -> Path:
    """Write the figure as a PNG (parent directories created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=DPI)
    return path

"""Figures a person can read: the domain x expert routing heat map, the continual accuracy matrix, the
expert-load bar chart, per-domain accuracy bars with seed ranges, curves over training steps (learning
curves with their interval over seeds), MoE
speed ratios against experts and tokens and the speed / memory frontier, drawn with matplotlib.

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


PALETTE = ("#3b528b", "#21918c", "#5ec962", "#fde725", "#440154", "#e36414", "#9a031e", "#6c757d")


def accuracy_bars(stats: dict[str, dict[str, dict[str, Any]]], domains: Sequence[str], *, title: str,
                  ylabel: str = "test exact match") -> Figure:
    """Grouped bars: one group per domain, one bar per run (`stats[run][domain]` = {mean, min, max}); each bar
    is the mean over seeds and its whisker the range (min-max), so a reader sees how much seeds disagree."""
    if not stats or not domains:
        raise ValueError(f"accuracy bars '{title}': no runs or no domains")
    runs = list(stats)
    width = 0.8 / len(runs)
    figure = Figure(figsize=(max(5.5, 1.1 * len(domains) * max(1, len(runs) / 3) + 2.5), 3.6), dpi=DPI)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    for i, run in enumerate(runs):
        cells = [stats[run].get(d) for d in domains]
        means = np.array([c["mean"] if c else np.nan for c in cells])
        low = np.array([c["mean"] - c["min"] if c else 0.0 for c in cells])
        high = np.array([c["max"] - c["mean"] if c else 0.0 for c in cells])
        xs = np.arange(len(domains)) - 0.4 + width * (i + 0.5)
        ax.bar(xs, means, width, yerr=[low, high], capsize=2, label=run, color=PALETTE[i % len(PALETTE)],
               error_kw={"linewidth": 0.8})
    ax.set_xticks(range(len(domains)), [str(d) for d in domains])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    return figure


def curves(series: dict[str, Sequence[Sequence[float]]], *, title: str, xlabel: str, ylabel: str, band: bool = False,
           ylim: tuple[float, float] | None = None) -> Figure:
    """One line per name through its (x, y) points, e.g. router entropy per layer over training steps; with `band`,
    through (x, mean, low, high) points with the interval shaded (low = high = mean where there is none, e.g. one
    seed), e.g. learning curves over seeds, on a wider figure with the legend beside the axes (long arm names)."""
    if not series:
        raise ValueError(f"curves '{title}': nothing to draw")
    figure = Figure(figsize=(6.5, 3.4) if band else (6.0, 3.2), dpi=DPI)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    for i, (name, points) in enumerate(series.items()):
        rows = _array(points).reshape(-1, 4 if band else 2)
        colour = PALETTE[i % len(PALETTE)]
        ax.plot(rows[:, 0], rows[:, 1], marker="o", markersize=2, label=name, color=colour)
        if band:
            ax.fill_between(rows[:, 0], rows[:, 2], rows[:, 3], color=colour, alpha=0.2, linewidth=0)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, **({"loc": "upper left", "bbox_to_anchor": (1.0, 1.0)} if band else {}))
    figure.tight_layout()
    return figure


def speed_ratios(rows: Sequence[dict[str, Any]], *, title: str) -> Figure:
    """MoE layer speed against its references: per benchmark shape (`tokens`, `experts`, ...), the time ratio
    ours / dense FFN of the same active compute and ours / the best Hugging Face block (1 = as fast)."""
    if not rows:
        raise ValueError(f"speed ratios '{title}': no rows")
    labels = [f"{r['tokens']} tok\n{r['experts']} exp" for r in rows]
    figure = Figure(figsize=(max(5.0, 1.0 * len(rows) + 2.5), 3.4), dpi=DPI)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    xs = np.arange(len(rows))
    for i, (key, name) in enumerate((("ours_over_dense", "ours / dense FFN"), ("ours_over_best_hf", "ours / best HF"))):
        ax.bar(xs - 0.2 + 0.4 * i, [r[key] for r in rows], 0.4, label=name, color=PALETTE[i])
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(xs, labels, fontsize=8)
    ax.set_ylabel("time ratio (lower is faster)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    figure.tight_layout()
    return figure


def frontier(points: dict[str, Sequence[float]], *, title: str, xlabel: str, ylabel: str) -> Figure:
    """A labelled scatter of named configurations (x, y), e.g. memory against decode speed, with the
    Pareto front (least x for the most y) drawn through the configurations no other one beats on both."""
    if not points:
        raise ValueError(f"frontier '{title}': no points")
    names = list(points)
    xy = _array([points[n] for n in names]).reshape(-1, 2)
    figure = Figure(figsize=(6.4, 3.8), dpi=DPI)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    ax.scatter(xy[:, 0], xy[:, 1], color=PALETTE[0], zorder=3)
    for (x, y), name in zip(xy, names):
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    front = [i for i in range(len(names)) if not any(
        xy[j, 0] <= xy[i, 0] and xy[j, 1] >= xy[i, 1] and (xy[j] != xy[i]).any() for j in range(len(names)))]
    front.sort(key=lambda i: xy[i, 0])
    ax.plot(xy[front, 0], xy[front, 1], color=PALETTE[5], linestyle="--", linewidth=1, label="Pareto front")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
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

"""The figures of `lightning_moe.plots` carry what a reader needs: the names on the axes, the value in
every cell, a colour bar, and a width TensorBoard shows legibly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_moe import plots

DOMAINS = ["count", "colour", "position_lr"]
SHARE = torch.tensor([[0.70, 0.10, 0.15, 0.05],
                      [0.25, 0.25, 0.25, 0.25],
                      [0.00, 0.90, 0.05, 0.05]])  # (domains, experts), rows sum to 1


def _ticks(axis) -> list[str]:
    return [label.get_text() for label in axis]


def _cell_texts(figure) -> list[str]:
    return [t.get_text() for t in figure.axes[0].texts]


def test_routing_heatmap_names_domains_and_experts_and_writes_every_value():
    figure = plots.routing_heatmap(SHARE, DOMAINS, "layer0", "val")
    ax = figure.axes[0]
    assert _ticks(ax.get_yticklabels()) == DOMAINS
    assert _ticks(ax.get_xticklabels()) == ["0", "1", "2", "3"]
    assert ax.get_xlabel() == "expert" and ax.get_ylabel() == "domain" and "layer0" in ax.get_title()
    # every cell's value, row by row, as the reader sees it
    assert _cell_texts(figure) == [f"{v:.2f}" for v in SHARE.flatten().tolist()]
    assert len(figure.axes) == 2  # the heat map and its colour bar
    image = plots.to_image(figure)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.shape[1] >= 300 and image.shape[0] >= 200
    assert image.std() > 10  # something is drawn, not a blank canvas


def test_accuracy_matrix_names_tasks_and_leaves_untrained_rows_blank():
    tasks = ["count", "position_lr", "position_tb"]
    trained = [[0.9, 0.25, 0.5], [0.4, 0.95, 0.5]]  # two of three tasks trained
    figure = plots.accuracy_matrix(trained, tasks)
    ax = figure.axes[0]
    assert _ticks(ax.get_xticklabels()) == tasks
    assert _ticks(ax.get_yticklabels()) == [f"after {t}" for t in tasks]
    assert _cell_texts(figure) == ["0.900", "0.250", "0.500", "0.400", "0.950", "0.500"]  # no text in the blank row
    assert plots.to_image(figure).shape[1] >= 300


def test_expert_load_bars_are_the_share_of_routed_slots():
    figure = plots.expert_load(torch.tensor([30.0, 10.0, 0.0, 60.0]), "layer1")
    ax = figure.axes[0]
    heights = [bar.get_height() for bar in ax.patches]
    np.testing.assert_allclose(heights, [0.3, 0.1, 0.0, 0.6])
    assert _ticks(ax.get_xticklabels()) == ["0", "1", "2", "3"]
    assert "max/mean 2.40" in ax.get_title()  # 0.6 / 0.25
    assert plots.to_image(figure).shape[1] >= 300


def test_heatmap_rejects_labels_that_do_not_match_the_matrix():
    with pytest.raises(ValueError, match="2 row labels"):
        plots.routing_heatmap(SHARE, DOMAINS[:2], "layer0")


def test_save_png_writes_a_png(tmp_path):
    path = plots.save_png(plots.routing_heatmap(SHARE, DOMAINS, "layer0"), tmp_path / "sub" / "map.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_import_neither_lightning_nor_torch():
    # a report draws from numbers in a results.json; the figures must not need the training stack
    import subprocess
    import sys

    code = "import sys, lightning_moe.plots; print(sorted(m for m in ('lightning', 'torch') if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[1]).stdout.strip()
    assert loaded == "[]"

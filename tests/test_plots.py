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


def test_accuracy_bars_draw_the_mean_with_the_seed_range_as_whiskers():
    stats = {"LoRA": {"a": {"mean": 0.6, "min": 0.5, "max": 0.8}, "b": {"mean": 0.2, "min": 0.2, "max": 0.2}},
             "MoLE": {"a": {"mean": 0.9, "min": 0.85, "max": 0.95}}}  # no value for b: no bar, not a zero
    figure = plots.accuracy_bars(stats, ["a", "b"], title="t")
    ax = figure.axes[0]
    heights = [p.get_height() for p in ax.patches]
    assert heights[:2] == pytest.approx([0.6, 0.2]) and heights[2] == pytest.approx(0.9) and np.isnan(heights[3])
    whiskers = ax.containers[0].lines[2][0].get_segments()  # the first ErrorbarContainer, LoRA's (min, max) per domain
    assert [tuple(np.round(s[:, 1], 6)) for s in whiskers] == [(0.5, 0.8), (0.2, 0.2)]
    assert _ticks(ax.get_xticklabels()) == ["a", "b"] and [t.get_text() for t in ax.get_legend().texts] == ["LoRA", "MoLE"]
    with pytest.raises(ValueError, match="no runs"):
        plots.accuracy_bars({}, ["a"], title="t")


def test_speed_ratios_frontier_and_curves_carry_their_numbers(tmp_path):
    rows = [{"tokens": 16, "experts": 8, "ours_over_dense": 1.5, "ours_over_best_hf": 0.7},
            {"tokens": 512, "experts": 16, "ours_over_dense": 2.0, "ours_over_best_hf": 0.5}]
    ax = plots.speed_ratios(rows, title="s").axes[0]
    assert [p.get_height() for p in ax.patches] == [1.5, 2.0, 0.7, 0.5]
    assert _ticks(ax.get_xticklabels()) == ["16 tok\n8 exp", "512 tok\n16 exp"]
    # the front: least memory for the most speed; "slow and big" is dominated by "fast"
    points = {"in memory": (100.0, 50.0), "fast": (40.0, 45.0), "small": (10.0, 5.0), "slow and big": (60.0, 20.0)}
    ax = plots.frontier(points, title="f", xlabel="MiB", ylabel="tok/s").axes[0]
    front = ax.lines[0].get_xydata()
    assert front.tolist() == [[10.0, 5.0], [40.0, 45.0], [100.0, 50.0]]
    assert sorted(t.get_text() for t in ax.texts) == sorted(points)
    ax = plots.curves({"layer0": [(1, 1.0), (5, 0.5)]}, title="c", xlabel="step", ylabel="nats").axes[0]
    assert ax.lines[0].get_xydata().tolist() == [[1.0, 1.0], [5.0, 0.5]]
    path = plots.save_png(plots.frontier(points, title="f", xlabel="x", ylabel="y"), tmp_path / "f.png")
    assert path.stat().st_size > 5_000


def test_learning_curves_draw_the_mean_and_shade_the_interval():
    series = {"LoRA": [(64, 0.5, 0.4, 0.6), (128, 0.7, 0.65, 0.75)], "MoLE": [(64, 0.55, 0.55, 0.55)]}
    ax = plots.curves(series, title="l", xlabel="samples per domain", ylabel="val exact match", band=True,
                      ylim=(0, 1.05)).axes[0]
    assert ax.lines[0].get_xydata().tolist() == [[64.0, 0.5], [128.0, 0.7]]
    band = ax.collections[0].get_paths()[0].vertices  # LoRA's shaded interval: low and high at each x
    assert {(x, y) for x, y in np.round(band, 6).tolist()} >= {(64.0, 0.4), (64.0, 0.6), (128.0, 0.65), (128.0, 0.75)}
    assert [t.get_text() for t in ax.get_legend().texts] == ["LoRA", "MoLE"]
    with pytest.raises(ValueError, match="nothing to draw"):
        plots.curves({}, title="l", xlabel="x", ylabel="y", band=True)

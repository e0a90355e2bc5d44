"""`python -m lightning_moe.experiments.report --quick`: from the experiments' smoke runs (shared with their own
tests through `--reuse`) and the benchmarks' quick runs, it writes report.md with real PNG figures, and
writes the docs' results sections between their markers, idempotently."""

from __future__ import annotations

import json

import numpy as np
from matplotlib.image import imread

from lightning_moe.experiments import report

EXPECTED = ["conflict_accuracy.png", "conflict_routing_mole3_mixture.png", "conflict_routing_oracle_mixture.png",
            "continual_mora.png", "continual_mora_task_oracle.png", "continual_final.png", "distill_accuracy.png",
            "moe_speed.png", "edge_frontier.png"]


def assert_real_png(path) -> None:
    """A picture, not an empty or one-colour canvas: a few kB, several hundred pixels wide, many colours."""
    assert path.stat().st_size > 5_000, path
    image = imread(path)
    assert image.shape[0] >= 200 and image.shape[1] >= 300, (path, image.shape)
    assert np.unique(image.reshape(-1, image.shape[-1]), axis=0).shape[0] > 20, path


def test_quick_report_writes_figures_and_docs_sections(quick_outputs, tmp_path):
    for name in ("conflict", "continual", "distill"):
        quick_outputs.get(name)
    root = quick_outputs.root
    written = report.main(["--out", str(root), "--quick", "--reuse", str(root), "--threads", "1"])
    assert written == root / "report.md"
    text = written.read_text()
    for name in EXPECTED:
        assert_real_png(root / "figures" / name)
        assert f"](figures/{name})" in text
    # every part's section: its protocol and verdict from the experiment, the stamp beside each figure
    for heading in ("## MoLE: data conflict", "## MoRA: continual", "## LLaVA-MoD: distillation",
                    "## SparseMoE speed", "## EdgeMoE: speed / memory frontier"):
        assert heading in text
    assert text.count("### Protocol (declared before the runs)") == 3
    assert "torch threads._" in text and "Verdict over the seeds" in text and "Not run" not in text
    assert json.loads((root / "timings.json").read_text())["conflict"] < 5  # reused, not run again

    # the docs: each page gets its section between markers, figures under docs/figures/report/; twice = once
    docs = tmp_path / "docs"
    docs.mkdir()
    for part in report.PARTS:
        (docs / part.page).write_text(f"# {part.page}\n\nHand-written text.\n")
    for _ in range(2):
        report.update_docs(root, docs, report.PARTS)
    mole = (docs / "mole.md").read_text()
    assert mole.startswith("# mole.md\n\nHand-written text.\n")
    assert mole.count("<!-- report:conflict begin -->") == 1 and mole.count("<!-- report:conflict end -->") == 1
    assert "](figures/report/conflict_accuracy.png)" in mole
    assert (docs / "figures" / "report" / "conflict_accuracy.png").is_file()

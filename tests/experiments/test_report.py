"""`python -m lightning_moe.experiments.report --quick`: from the experiments' smoke runs (shared with their own
tests through `--reuse`) and the MoE-layer benchmark's quick run, it writes report.md with real PNG figures,
and writes the docs' results sections between their markers, idempotently. The EdgeMoE benchmark's quick run
(about 4 minutes on the shared 2-core machine; tests/test_benchmarks.py runs it) is left out of the suite's
report: its figure is drawn here from a results.json of the benchmark's layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
from matplotlib.image import imread

from lightning_moe.experiments import report

EXPECTED = ["conflict_accuracy.png", "conflict_learning_curves.png", "conflict_routing_mole3_mixture.png", "conflict_routing_oracle_mixture.png",
            "continual_mora.png", "continual_mora_task_oracle.png", "continual_final.png", "distill_accuracy.png",
            "unimoe_accuracy.png", "unimoe_learning_curves.png", "moe_llava_accuracy.png", "moe_llava_pope.png",
            "moe_llava_learning_curves.png", "moe_speed.png"]
PARTS = ["conflict", "continual", "distill", "unimoe", "moe_llava", "moe_layer"]


def assert_real_png(path) -> None:
    """A picture, not an empty or one-colour canvas: a few kB, several hundred pixels wide, many colours."""
    assert path.stat().st_size > 5_000, path
    image = imread(path)
    assert image.shape[0] >= 200 and image.shape[1] >= 300, (path, image.shape)
    assert np.unique(image.reshape(-1, image.shape[-1]), axis=0).shape[0] > 20, path


@pytest.mark.slow  # draws from the five quick experiments and moe_layer's quick run (run here if their tests have not)
@pytest.mark.last  # ... which have by then: their tests run before it
def test_quick_report_writes_figures_and_docs_sections(quick_outputs, tmp_path):
    for name in PARTS:
        quick_outputs.get(name)
    root = quick_outputs.root
    written = report.main(["--out", str(root), "--quick", "--reuse", str(root), "--threads", "1", "--only", *PARTS])
    assert written == root / "report.md"
    text = written.read_text()
    for name in EXPECTED:
        assert_real_png(root / "figures" / name)
        assert f"](figures/{name})" in text
    routing = sorted((root / "figures").glob("unimoe_routing_unimoe_*.png"))  # one modality x expert map per layer
    assert routing and all(f"](figures/{p.name})" in text for p in routing)
    assert_real_png(routing[0])
    # every part's section: its protocol and verdict from the experiment, the stamp beside each figure
    for heading in ("## MoLE: data conflict", "## MoRA: continual", "## LLaVA-MoD: distillation", "## Uni-MoE:",
                    "## MoE-LLaVA:", "## SparseMoE speed"):
        assert heading in text
    assert text.count("### Protocol (declared before the runs)") == 5
    # every section carries the commit its numbers came from (a dirty tree said so), the benchmark's included
    assert "Verdict over the expert counts" in text and "Not run" not in text
    stamps = [line for line in text.splitlines() if line.startswith("From `")]
    assert len(stamps) == len(PARTS) and all("commit " in line for line in stamps), stamps
    assert all(seconds < 5 for seconds in json.loads((root / "timings.json").read_text()).values())  # reused, not run

    # the docs: each page gets its section between markers, figures under docs/figures/report/; twice = once
    docs = tmp_path / "docs"
    docs.mkdir()
    parts = [p for p in report.PARTS if p.name in PARTS]
    for part in parts:
        (docs / part.page).write_text(f"# {part.page}\n\nHand-written text.\n")
    for _ in range(2):
        report.update_docs(root, docs, parts)
    mole = (docs / "mole.md").read_text()
    assert mole.startswith("# mole.md\n\nHand-written text.\n")
    assert mole.count("<!-- report:conflict begin -->") == 1 and mole.count("<!-- report:conflict end -->") == 1
    assert "](figures/report/conflict_accuracy.png)" in mole
    assert (docs / "figures" / "report" / "conflict_accuracy.png").is_file()
    # each experiment's results kept beside its page, so that --reuse docs/results regenerates the section
    kept = json.loads((docs / "results" / "conflict" / "results.json").read_text())
    assert kept == json.loads((root / "conflict" / "results.json").read_text())
    regenerated = tmp_path / "regenerated"
    report.main(["--out", str(regenerated), "--quick", "--reuse", str(docs / "results"), "--only", "conflict"])
    assert (regenerated / "docs" / "conflict.md").read_text() == (root / "docs" / "conflict.md").read_text()


def test_edge_frontier_is_drawn_from_the_benchmarks_results(tmp_path):
    mib = 2 ** 20
    # the layout benchmarks/edge_offload.py writes: speed.results.<configuration> with memory and speed
    speed = {name: {"model_rss": rss * mib, "decode_tokens_per_second": tps, "peak_rss": 2 * rss * mib}
             for name, rss, tps in (("in memory", 20, 120.0), ("on demand (no cache)", 18, 25.0),
                                    ("LRU cache", 18.3, 50.0), ("EdgeMoE", 19, 26.0))}
    out = tmp_path / "report"
    (out / "edge_offload").mkdir(parents=True)
    (out / "edge_offload" / "results.json").write_text(json.dumps(
        {"speed": {"results": speed}, "stamp": "2026-12-01 on x86_64 (1 torch threads)"}))
    (out / "edge_offload" / "results.md").write_text("# table\n")
    edge = [p for p in report.PARTS if p.name == "edge_offload"]
    text = report.write_report(out, edge, "python -m lightning_moe.experiments.report --only edge_offload").read_text()
    assert_real_png(out / "figures" / "edge_frontier.png")
    assert "](figures/edge_frontier.png)" in text and "2026-12-01 on x86_64 (1 torch threads)" in text
    # a part without results says so instead of failing
    moe = [p for p in report.PARTS if p.name == "moe_layer"]
    assert "Not run" in report.write_report(out, moe, "python -m lightning_moe.experiments.report").read_text()


def test_an_experiment_records_its_output_directory_as_given_from_the_repository(tmp_path, monkeypatch):
    """`--out runs/report` run from the repository root reads so in the command each experiment records, not as this
    machine's absolute path; a directory outside the working directory stays absolute."""
    given = {}
    monkeypatch.setattr("lightning_moe.experiments.continual.main", lambda argv: given.setdefault("argv", argv))
    monkeypatch.chdir(tmp_path)
    args = report.build_parser().parse_args(["--out", "runs/report", "--seeds", "0", "--jobs", "1"])
    report.PARTS[[p.name for p in report.PARTS].index("continual")].run((tmp_path / "runs/report/continual"), args)
    assert given["argv"][:2] == ["--out", "runs/report/continual"]
    assert report._as_given(tmp_path.parent / "elsewhere") == str(tmp_path.parent / "elsewhere")


def test_unimoe_learning_curves_count_the_stage_2_samples_of_uni_moe(tmp_path, monkeypatch):
    from lightning_moe.experiments.unimoe import ARMS, BASE_RUNS, DOMAINS, LABELS

    drawn = {}
    monkeypatch.setattr(report.plots, "curves", lambda curves, **kwargs: drawn.setdefault("curves", curves))
    monkeypatch.setattr(report.plots, "save_png", lambda figure, path: path)
    summary = {"plan": {"expert_steps": 80, "batch_size": 64}, "modality_routing": {},
               "accuracy": {row: {d: 0.5 for d in DOMAINS} for row in (*ARMS, *BASE_RUNS)}}
    curve = [[1280.0, 0.5, 0.4, 0.6], [10240.0, 0.6, 0.5, 0.7]]
    results = {"per_seed": {"0": summary, "1": summary}, "learning_curves": {arm: curve for arm in ARMS}}
    report.unimoe_figures(results, tmp_path)
    # every arm starts from stage 1; Uni-MoE's stage 3 follows its three stage-2 runs of 80 steps of 64 samples
    assert drawn["curves"][LABELS["unimoe"]] == [[1280.0 + 15360, 0.5, 0.4, 0.6], [10240.0 + 15360, 0.6, 0.5, 0.7]]
    assert all(drawn["curves"][LABELS[arm]] == curve for arm in ARMS if arm != "unimoe")

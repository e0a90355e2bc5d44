"""`python -m lightning_moe.experiments.robustness A B`: two runs of the experiments with other thread counts,
verdict by verdict, on hand-made results of the experiments' layouts: a verdict's label must agree in both (its
reason may differ), a changed or missing one makes the experiment not robust, and the docs block is written once."""

from __future__ import annotations

import json

from lightning_moe.experiments import robustness


def diff(mean: float, low: float, high: float) -> dict:
    return {"mean": mean, "low": low, "high": high, "sem": 0.01, "method": "t", "n": 10, "above": 7, "below": 2,
            "ties": 1}


def results(threads: int, commit: str = "abc", **verdicts) -> dict:
    return {"environment": {"command": f"python -m x --threads {threads}", "date": "2026-12-07",
                            "torch_threads": threads, "git_commit": commit, "git_dirty": False},
            "differences": {"mora - lora_sequential": {"bwt": diff(0.02, -0.01, 0.05)}, "unimoe": diff(1, 0, 2)},
            **verdicts}


def write(root, name: str, content: dict) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "results.json").write_text(json.dumps(content))


def test_labels_must_agree_and_a_changed_or_missing_one_is_not_robust(tmp_path, capsys):
    a, b, docs = tmp_path / "t1", tmp_path / "t2", tmp_path / "docs"
    docs.mkdir()
    for page in ("mora.md", "unimoe.md", "moe_llava.md"):
        (docs / page).write_text("# page\n")
    # continual: the same labels with other reasons: robust
    write(a, "continual", results(1, verdict="inconclusive: the interval straddles the margin", diagnosis="interference"))
    write(b, "continual", results(2, verdict="inconclusive: oracle failed", diagnosis="interference"))
    # unimoe: one comparison flips from not confirmed to inconclusive
    write(a, "unimoe", results(1, verdicts={"copies": "not confirmed", "dense": "confirmed"}))
    write(b, "unimoe", results(2, verdicts={"copies": "inconclusive: the interval straddles the margin",
                                            "dense": "confirmed"}))
    # moe_llava: a claim missing from one run
    write(a, "moe_llava", results(1, claims={"sparse matches dense": "confirmed"}))
    write(b, "moe_llava", results(2, commit="def", claims={}))
    assert robustness.main([str(a), str(b), "--docs", str(docs)]) is False
    assert capsys.readouterr().out.strip() == "continual: robust, unimoe: NOT robust, moe_llava: NOT robust"
    mora = (docs / "mora.md").read_text()
    assert "**robust** to the reduction order" in mora and "| verdict | inconclusive: the interval straddles" in mora
    assert "mora - lora_sequential (bwt) | +0.020 [-0.010, +0.050]" in mora and "1 against 2 torch threads" in mora
    unimoe = (docs / "unimoe.md").read_text()
    assert "**Not robust**: the label changes for verdicts: copies." in unimoe and "| verdicts: dense |" in unimoe
    moe_llava = (docs / "moe_llava.md").read_text()
    assert "claims: sparse matches dense | confirmed | missing | **no** |" in moe_llava
    assert "different commits" in moe_llava and "different commits" not in mora and "commit abc." in mora
    assert json.loads((docs / "results/threads2/unimoe/results.json").read_text())["verdicts"]["dense"] == "confirmed"
    # rewritten in place, not appended again
    assert robustness.main([str(a), str(b), "--docs", str(docs), "--only", "continual"]) is True
    assert (docs / "mora.md").read_text().count("<!-- report:continual-threads begin -->") == 1
    assert (a / "robustness.md").read_text().startswith("# Verdicts under another thread count\n\ncontinual: robust")

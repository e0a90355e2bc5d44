"""The LLaVA-MoD experiment's smoke version: every run happens through the CLI's classes and the
results (tables, parameter counts, equal student steps, TensorBoard logs) are written."""

from __future__ import annotations

import json

from lightning_moe.experiments.distill import main


def test_distill_experiment_quick_writes_results(tmp_path, monkeypatch):
    out = tmp_path / "distill"
    summary = main(["--out", str(out), "--quick"])
    runs = {r["name"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert summary["quick"] and list(runs) == ["teacher", "mimic_dense", "mimic_sparse", "preference",
                                               "baseline_instruct", "baseline_moe"]
    assert [r["method"] for r in runs.values()] == ["MoETuning"] + 3 * ["MoDDistillation"] + 2 * ["MoETuning"]
    # equal student steps with and without the teacher
    assert runs["mimic_dense"]["steps"] == runs["baseline_instruct"]["steps"] == 2
    assert runs["mimic_sparse"]["steps"] + runs["preference"]["steps"] == runs["baseline_moe"]["steps"] == 4
    # the teacher is larger; the sparse students activate fewer parameters than they hold
    assert runs["teacher"]["params_total"] > runs["mimic_dense"]["params_total"]
    for name in ("mimic_sparse", "preference", "baseline_moe"):
        assert runs[name]["params_activated"] < runs[name]["params_total"]
    assert runs["preference"]["params_total"] == runs["baseline_moe"]["params_total"]
    for run in runs.values():
        assert "test/pope/pope_f1" in run["metrics"] and "test/count/exact_match" in run["metrics"]
        assert run["step_time_s"] > 0 and run["peak_memory_mb"] > 0
    table = (out / "results.md").read_text()
    assert "| **distilled student** (after preference) |" in table and "POPE F1" in table
    assert list((out / "runs" / "mod" / "preference").rglob("events.out.tfevents.*"))
    assert (out / "configs" / "baseline_moe.yaml").is_file()

    # kd_lm reusing that teacher, named relative to the caller's directory (the experiment works inside
    # --out, where a relative --teacher-from was once looked up)
    monkeypatch.chdir(tmp_path)
    again = main(["--out", "distill_kd_lm", "--quick", "--teacher-from", "distill", "--mimic-lm-weight", "1.0"])
    reused = {r["name"]: r for r in again["runs"]}
    assert reused["teacher"] == runs["teacher"]  # its row is kept, not retrained
    assert (tmp_path / "distill_kd_lm" / "runs" / "mod" / "teacher" / "model").is_dir()
    assert not (tmp_path / "distill_kd_lm" / "runs" / "mod" / "teacher" / "version_0").exists()
    assert list(reused) == list(runs)

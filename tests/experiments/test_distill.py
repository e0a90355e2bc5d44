"""The LLaVA-MoD experiment's smoke version: every run happens through the CLI's classes and the
results (tables, parameter counts, equal student steps, the extra-steps control, TensorBoard logs) are
written; with several seeds the student runs repeat per seed and the table reports their mean and range."""

from __future__ import annotations

import json

import pytest
import yaml

from pathlib import Path

from lightning_moe.cli import effective_config
from lightning_moe.experiments import RunResult, distill
from lightning_moe.experiments.distill import config, main


@pytest.mark.slow  # the quick experiment: 10 CLI runs (3 of them the one-rung selection), in its own process
def test_distill_experiment_quick_writes_results(quick_outputs, monkeypatch):
    out = quick_outputs.get("distill")
    root = out.parent  # the shared smoke runs' directory
    summary = json.loads((out / "results.json").read_text())
    runs = {r["name"]: r for r in summary["runs"]}
    assert summary["protocol"]["seeds"] == [0] and summary["protocol"]["reported_split"] == "test"
    # the data: the co-occurrence variant generated (tiny, one rung in --quick) under OUT/data, chosen on val by the
    # teacher and the undistilled student of the selection seed, whose runs stay apart from the reported ones
    settings = summary["protocol"]["settings"]
    assert settings["shapes"] == {"cooccurrence": distill.COOCCURRENCE} and len(settings["ladder"]) == 1
    assert set(settings["ladder"][0]["val"]) == {"teacher", "students", "chance"}
    assert set(settings["ladder"][0]["val"]["students"]) == {"1000"}
    data = Path(summary["data_root"])
    assert data.parent == out / "data" and (data / "pope_cooccur" / "test.jsonl").is_file()
    assert (out / "selection" / "d0" / "runs" / "mod" / "select_moe_seed1000" / "model").is_dir()
    # the seed's own teacher, trained at the seed where its students find it (not the selection's, copied)
    assert (out / "runs" / "mod" / "teacher" / "model").is_dir() and runs["teacher"]["seed"] == 0
    assert "teacher" in summary["aggregate"]
    assert "Tried on val: generated, cooccurrence=0.9:" in (out / "results.md").read_text()
    assert summary["quick"] and list(runs) == ["teacher", "mimic_dense", "mimic_sparse", "preference", "control",
                                               "baseline_instruct", "baseline_moe", "dense_active"]
    assert [r["method"] for r in runs.values()] == (["MoETuning"] + 4 * ["MoDDistillation"] + 2 * ["MoETuning"]
                                                    + ["MoDDistillation"])
    # the control: the mimic objective for as many steps as preference, from the mimic_sparse checkpoint,
    # with the preference stage's optimizer
    assert runs["control"]["stage"] == "mimic_sparse" and runs["control"]["steps"] == runs["preference"]["steps"] == 2
    control = yaml.safe_load((out / "configs" / "control.yaml").read_text())
    preference = effective_config(config("preference"))  # the shipped configs include configs/_base/
    assert control["model"]["init_args"]["backbone"] == {"pretrained": "runs/mod/mimic_sparse/model"}
    assert control["model"]["init_args"]["optimizer"] == preference["model"]["init_args"]["optimizer"]
    assert control["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 1.0e-4  # preference's, not mimic's 5e-4
    assert control["model"]["init_args"]["mimic"]["kd_weight"] > 0
    assert control["model"]["init_args"].get("preference") is None
    assert runs["control"]["params_total"] == runs["preference"]["params_total"]  # not upcycled a second time
    # equal student steps with and without the teacher
    assert runs["mimic_dense"]["steps"] == runs["baseline_instruct"]["steps"] == 2
    assert runs["mimic_sparse"]["steps"] + runs["preference"]["steps"] == runs["baseline_moe"]["steps"] == 4
    # the teacher is larger than the students, the sparse ones included; the sparse students activate fewer
    # parameters than they hold, about as many as the dense student of their active size holds
    assert runs["teacher"]["params_total"] > runs["preference"]["params_total"] > runs["mimic_dense"]["params_total"]
    assert abs(runs["dense_active"]["params_total"] - runs["preference"]["params_activated"]) < 1_000
    assert runs["dense_active"]["steps"] == sum(runs[n]["steps"] for n in ("mimic_dense", "mimic_sparse", "preference"))
    assert set(summary["verdicts"]) == {"preference - baseline_moe", "preference - control", "preference - dense_active"}
    assert all(v.startswith("inconclusive") for v in summary["verdicts"].values())  # one seed
    for name in ("mimic_sparse", "preference", "control", "baseline_moe"):
        assert runs[name]["params_activated"] < runs[name]["params_total"]
    assert runs["preference"]["params_total"] == runs["baseline_moe"]["params_total"]
    for run in runs.values():
        assert "test/pope/pope_f1" in run["metrics"] and "test/count/exact_match" in run["metrics"]
        assert "test/pope_cooccur/pope_yes_ratio" in run["metrics"]  # the co-occurrence hallucination, measured
        assert run["step_time_s"] > 0 and run["peak_memory_mb"] > 0
    table = (out / "results.md").read_text()
    assert "| **distilled student** (after preference) |" in table and "POPE F1" in table
    assert "| control: mimic_sparse + as many more mimic steps |" in table and "POPE accuracy, preference - control" in table
    assert list((out / "runs" / "mod" / "preference").rglob("events.out.tfevents.*"))
    assert (out / "configs" / "baseline_moe.yaml").is_file()

    # kd_lm reusing that teacher, named relative to the caller's directory (the experiment works inside
    # --out, where a relative --teacher-from was once looked up), with two student seeds. The quick run above
    # trained every student through the CLI; here the runs are scripted (what each would have scored), so that
    # the seeds' layout and the aggregate are checked against known values without twelve more trainings.
    calls = []

    def scripted(run, workdir):
        calls.append((run.name, run.seed, Path(workdir), list(run.args)))
        score = {"mimic_dense": 0.1, "mimic_sparse": 0.2, "preference": 0.3, "control": 0.4}.get(run.name, 0.5)
        return RunResult(name=run.name, method="scripted", stage="", steps=2, wall_s=0.0, step_time_s=None,
                         peak_memory_mb=None, memory_kind="", params_total=1, params_activated=1, seed=run.seed,
                         metrics={"test/exact_match": score + run.seed / 10, "test/pope/pope_accuracy": 0.5})

    monkeypatch.setattr(distill, "execute", scripted)
    # a clean commit, so that each seed's result is kept for a rerun (a dirty checkout keeps nothing)
    environment = distill.environment
    monkeypatch.setattr(distill, "environment", lambda command: {**environment(command), "git_commit": "0" * 40,
                                                                 "git_dirty": False})
    monkeypatch.chdir(root)
    again = main(["--out", "distill_kd_lm", "--quick", "--teacher-from", "distill", "--mimic-lm-weight", "1.0",
                  "--seeds", "0", "1", "--jobs", "1"])  # one process: the scripted runs are this process's
    teacher = next(r for r in again["runs"] if r["name"] == "teacher")
    assert teacher == {**runs["teacher"], "seed": None}  # its row is kept (every seed's teacher), not retrained
    again_out = root / "distill_kd_lm"
    assert (again_out / "runs" / "mod" / "teacher" / "model").is_dir()
    assert not (again_out / "runs" / "mod" / "teacher" / "version_0").exists()
    students = [n for n in runs if n != "teacher"]
    assert [(name, seed) for name, seed, _, _ in calls] == [(n, s) for s in (0, 1) for n in students]
    for name, seed, workdir, args in calls:  # each seed in its own directory, with the teacher beside it
        assert workdir == again_out / f"seed{seed}", name
        assert f"--seed_everything={seed}" in args and f"--data.init_args.seed={seed}" in args, name
        assert ("--model.init_args.mimic.lm_weight=1.0" in args) == (name in ("mimic_dense", "mimic_sparse", "control",
                                                                              "dense_active"))
    for seed in (0, 1):
        assert (again_out / f"seed{seed}" / "runs" / "mod" / "teacher" / "model").is_dir()
    # the aggregate is the mean, min and max of the per-seed values
    stat = again["aggregate"]["control"]["test/exact_match"]
    assert stat["values"] == pytest.approx([0.4, 0.5]) and stat["mean"] == pytest.approx(0.45)
    assert stat["min"] == pytest.approx(0.4) and stat["max"] == pytest.approx(0.5)
    assert "mean over seeds 0, 1" in (again_out / "results.md").read_text()

    # stopped before seed 1 finished: the same command runs seed 1 again and takes seed 0 from its directory
    (again_out / "seed1" / "seed_result.json").unlink()
    calls.clear()
    resumed = main(["--out", "distill_kd_lm", "--quick", "--teacher-from", "distill", "--mimic-lm-weight", "1.0",
                    "--seeds", "0", "1", "--jobs", "1"])
    assert [(name, seed) for name, seed, _, _ in calls] == [(n, 1) for n in students]
    assert resumed["aggregate"] == again["aggregate"] and resumed["runs"] == again["runs"]


def test_a_stopped_selection_trains_again_only_what_it_had_not_scored(tmp_path, monkeypatch):
    """The selection's teacher and undistilled students are kept per rung under the run's resume key: the same
    key takes them back, one lost score is trained again alone, another key (another commit) trains everything."""
    trained = []
    scores = {0: (1.0, 0.97), 1: (0.9, 0.7)}  # rung -> (teacher, undistilled student): rung 0 is at the ceiling

    def teacher_val(workdir, quick, root):
        trained.append(("teacher", workdir.name))
        return scores[int(workdir.name[1:])][0]

    def undistilled_val(workdir, seed, quick, root):
        trained.append((seed, workdir.name))
        return scores[int(workdir.name[1:])][1] + seed / 1e4

    monkeypatch.setattr(distill, "selection_teacher_val", teacher_val)
    monkeypatch.setattr(distill, "undistilled_val", undistilled_val)
    monkeypatch.setattr(distill, "generated", lambda out, shapes, sizes: out / "data")
    monkeypatch.setattr(distill, "majority_answer", lambda root, domains, split: 0.3)
    ladder, key = ({"cooccurrence": 0.9}, {"cooccurrence": 0.9, "pixel_noise": 30}), {"git_commit": "a"}

    def select(run_key):
        trained.clear()
        return distill.select_difficulty(tmp_path, False, ladder, {}, [1, 2], run_key)

    first = select(key)
    assert first["chosen"]["level"] == 1
    assert trained == [("teacher", "d0"), (1, "d0"), (2, "d0"), ("teacher", "d1"), (1, "d1"), (2, "d1")]
    assert select(key) == first and trained == []
    (tmp_path / "selection" / "d1" / "kept" / "undistilled_seed2.json").unlink()
    assert select(key) == first and trained == [(2, "d1")]
    assert select({"git_commit": "b"}) == first and len(trained) == 6
    assert select(None) == first and len(trained) == 6  # a dirty tree keeps and takes nothing

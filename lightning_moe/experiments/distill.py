"""Does LLaVA-MoD's distillation help? Teacher, distilled sparse student, undistilled student.

    python -m lightning_moe.experiments.distill --out DIR [--quick] [--jobs N] [--threads N] [--seeds 0 1 ...]
        [--no-control] [--reuse EARLIER_OUT] [--mimic-lm-weight W]

Runs, through the CLI (`lightning_moe.cli.main` with the shipped configs, in DIR so that every
`runs/...` path lands there), on shapes data generated under DIR/data/ (`generate_shapes`) with the
co-occurrence variant of POPE (`pope_cooccur`: "Is there a circle?" where circles usually come with
squares; its test split asks about squares without circles, so hallucination shows in its POPE
precision and yes-ratio), at the difficulty chosen on val (`select_difficulty`, in DIR/selection/: the
first rung of `LADDER` at which the teacher is off the ceiling and the undistilled student, in every
selection seed, at least `SELECTION_GAP` below it; `rejections`):

1. the teacher, per seed (`configs/mod/teacher.yaml`: a larger dense model, instruct stage), trained at the seed on
   the chosen rung's data: a teacher trained once would hold every seed's interval to one draw of it, which another
   float order changes (the selection's teachers only choose the rung);
2. the student through `mimic_dense`, `mimic_sparse` and `preference` (`configs/mod/*.yaml`), at
   half the teacher's width (`STUDENT`: hidden 64, MLP 128 against 128 / 256), so that even with its
   experts it holds fewer parameters than the teacher;
3. the same student without a teacher at equal steps: MoE-tuning's instruct stage for as many
   steps as mimic_dense, then its moe stage for as many as mimic_sparse + preference (configs
   derived from the mimic ones, changing only the method, so data, sizes and optimizer match);
4. the control for the preference stage (on by default, `--no-control` skips it): from the same
   mimic_sparse checkpoint, as many extra steps as preference took, of the mimic_sparse objective
   with the preference stage's optimizer, so "preference" can be told apart from "more steps";
5. a dense student of the sparse student's active size (`DENSE_ACTIVE`: as many parameters as the sparse
   student activates per token), distilled (mimic_dense) for as many steps as its three stages.

The verdict (`verdicts`): on the primary metric (mean test exact match over the domains), the
distilled sparse student against the undistilled one, against the control and against the dense
student of its active size, each over seeds with its 95 % interval against `MARGIN`; inconclusive
when no rung of the ladder qualified, when the teacher is no better than the undistilled student
(nothing to distil) or a student sits at ceiling or chance.

Each run is tested on the test split (per-domain exact match from greedy generation, POPE
accuracy / F1 / yes-ratio). Writes DIR/results.json, DIR/results.md (tables), the TensorBoard
logs of every run under DIR/runs/mod/ and each run's console output under DIR/logs/. `--reuse`
takes the teacher of an earlier output directory, and the difficulty it was chosen at, instead of
choosing and training them (that one teacher, copied to every seed). `--seeds 0 1 2` repeats the runs (1-5) per
seed, each in DIR/seed<N>/ (its teacher under DIR/seed<N>/runs/mod/), and reports the mean and the range over the
seeds; started again on the same clean commit, it takes each finished seed's runs from DIR/seed<N>/seed_result.json
and the selection's scores from DIR/selection/d<i>/kept/.
`--quick` is the smoke version (a few steps, few samples).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from ..cli import effective_config
from ..data.synthetic import ShapesDifficulty, generate_shapes
from ..paths import shipped_path
from . import (Run, RunResult, command_line, environment, execute, experiment_parser, final_val, kept,
               majority_answers, map_kept_seeds, parse_args, progress, resume_key, working_directory, write_results)
from .protocol import NO_DISCRIMINATING_SETTING, SELECTION_SEEDS, Comparison, Protocol, select_first, setting_words
from .statistics import TOLERANCE, at_ceiling_or_chance, decide, interval_words, paired_difference, seed_stat, spread

CONFIGS = "configs/mod"  # shipped_path names it in a checkout or an installed package
DOMAINS = ("count", "colour", "pope", "position_lr", "position_tb", "pope_cooccur")
POPE_DOMAINS = ["pope", "pope_cooccur"]
# pope_cooccur's co-occurrence of circle and square in train and val: at 0.9 a model trained on it alone said
# `yes` to 39 % of the test's baits (docs/data.md)
COOCCURRENCE = 0.9
# the data's difficulty, chosen on val (`select_difficulty`): `ShapesDifficulty` settings, easiest first
LADDER = ({"cooccurrence": COOCCURRENCE}, {"cooccurrence": COOCCURRENCE, "pixel_noise": 30},
          {"cooccurrence": COOCCURRENCE, "pixel_noise": 30, "colour_noise": 30})
DATA_SIZES = {"n_train": 2000, "n_eval": 200}  # generated samples per domain: train, and val and test each
QUICK_DATA_SIZES = {"n_train": 64, "n_eval": 8}
# the rule's gap: on val the undistilled student at least 5 points below the teacher, in every selection seed, so
# that a distilled student can gain the 2-point margin over it and still stay below the teacher
SELECTION_GAP = 0.05
# keys of MoDDistillation that MoETuning does not take (the undistilled baseline drops them)
MOD_ONLY_KEYS = ("teacher", "teacher_dtype", "teacher_tokenizer", "mimic", "preference")
# the smoke version: every piece runs, nothing is learnt
QUICK = ["--trainer.max_steps=2", "--trainer.limit_train_batches=2", "--trainer.limit_test_batches=1",
         "--trainer.enable_progress_bar=false", "--data.init_args.batch_size=4", "--data.init_args.eval_batch_size=8",
         "--data.init_args.max_eval_samples_per_domain=8"]
# ... on three domains of the tiny generated set (QUICK_DATA_SIZES), so data setup takes a fraction of a second
QUICK_DOMAINS = ("count", "pope", "pope_cooccur")
# the student at half the teacher's width (configs/mod: tiny-llama, hidden 128, MLP 256; the teacher 4 layers):
# 4 experts of MLP 128 in 2 layers hold fewer parameters than the teacher's 4 dense layers
STUDENT = {"hidden_size": 64, "intermediate_size": 128}
# the dense student of the sparse student's active size: the MoE layers are every other layer (mimic_sparse.yaml,
# top-2 of 4 experts), so a token's MLP width averages (128 + 2 x 128) / 2 = 192 over the two layers
DENSE_ACTIVE = {"hidden_size": 64, "intermediate_size": 192}
# the primary comparisons' margin: 2 points of the mean test exact match over the five domains (1000 samples)
MARGIN = 0.02


def student_size(overrides: dict[str, int]) -> list[str]:
    """The command-line override that sets the student's LLM size (the first stage of each chain; later stages
    start from its saved model)."""
    return [f"--model.init_args.backbone.llm_overrides={json.dumps(overrides)}"]


def quick_data(preference: bool) -> list[str]:
    train = "preference/{d}/train.jsonl" if preference else "{d}/train.jsonl"
    domains = {d: {"train": train.format(d=d), "val": f"{d}/val.jsonl", "test": f"{d}/test.jsonl"} for d in QUICK_DOMAINS}
    return [f"--data.init_args.domains={json.dumps(domains)}"]


def data_overrides(root: Path) -> list[str]:
    """A run on the generated set at `root`, with POPE metrics on both yes/no domains."""
    return [f"--data.init_args.root={root}", f"--model.init_args.pope_domains={json.dumps(POPE_DOMAINS)}"]


def preference_domains() -> list[str]:
    """The preference stage lists its domains (configs/mod/preference.yaml): every domain's pairs, pope_cooccur's too."""
    domains = {d: {"train": f"preference/{d}/train.jsonl", "val": f"{d}/val.jsonl", "test": f"{d}/test.jsonl"}
               for d in DOMAINS}
    return [f"--data.init_args.domains={json.dumps(domains)}"]


# validation during fit is skipped: every run is tested once at its end
NO_VALIDATION = ["--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0"]


def config(name: str) -> Path:
    """A shipped config of this experiment, e.g. `config("teacher")`."""
    return shipped_path(f"{CONFIGS}/{name}.yaml")


def seed_overrides(seed: int) -> list[str]:
    """A student seed: weights, dropout (seed_everything) and the training sampler's order."""
    return [f"--seed_everything={seed}", f"--data.init_args.seed={seed}"]


def derive_config(source: Path, target: Path, name: str, steps: int, pretrained: str | None,
                  change: Callable[[dict], None]) -> Path:
    """A copy of the shipped config `source` for run `name`: `steps` steps, its own logger name and
    hand-off directory, `pretrained` as the backbone, then `change(config)`; written to `target`. It starts
    from the effective config (configs/_base/ included, defaults filled in), so `target` stands alone."""
    config = effective_config(source)
    init = config["model"]["init_args"]
    if pretrained:
        init["backbone"] = {"pretrained": pretrained}
    trainer = config["trainer"]
    trainer["max_steps"] = trainer["val_check_interval"] = steps
    trainer["logger"]["init_args"]["name"] = name
    for callback in trainer["callbacks"]:
        if callback["class_path"].endswith("SavePretrained"):
            callback["init_args"]["dirpath"] = f"runs/mod/{name}/model"
    change(config)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(f"# derived from {CONFIGS}/{source.name} by lightning_moe/experiments/distill.py\n"
                      + yaml.safe_dump(config, sort_keys=False))
    return target


def baseline_config(source: Path, target: Path, name: str, stage: str, steps: int, pretrained: str | None) -> Path:
    """The mimic config `source` as MoE-tuning without a teacher: same student, data and optimizer."""
    def without_teacher(config: dict) -> None:
        init = config["model"]["init_args"]
        for key in MOD_ONLY_KEYS:
            init.pop(key, None)
        config["model"]["class_path"] = "lightning_moe.methods.MoETuning"
        init["stage"] = stage

    return derive_config(source, target, name, steps, pretrained, without_teacher)


def control_config(target: Path, steps: int) -> Path:
    """The control for the preference stage: `steps` more steps of the mimic_sparse objective (KL to the
    teacher) from the same checkpoint (runs/mod/mimic_sparse/model), with the preference stage's optimizer
    and learning rate, on the mimic data at mimic_sparse's batch (64 sequences, as a preference step's
    32 chosen + 32 rejected). It differs from the preference run only in the objective and its data."""
    preference = effective_config(config("preference"))["model"]["init_args"]

    def preference_optimizer(config: dict) -> None:
        config["model"]["init_args"]["optimizer"] = preference["optimizer"]

    return derive_config(config("mimic_sparse"), target, "control", steps, "runs/mod/mimic_sparse/model",
                         preference_optimizer)


def reuse_teacher(previous: Path, out: Path) -> RunResult:
    """The teacher of an earlier run of this experiment: its model is copied, its results row is kept. An earlier run
    over several seeds trained one per seed: the first seed's is taken."""
    summary_file = previous / "results.json"
    if not summary_file.is_file():
        raise FileNotFoundError(f"{previous} holds no finished run of this experiment ({summary_file})")
    row = next(r for r in json.loads(summary_file.read_text())["runs"] if r["name"] == "teacher")
    holder = previous if (previous / "runs" / "mod" / "teacher" / "model").is_dir() else previous / f"seed{row['seed']}"
    if not (holder / "runs" / "mod" / "teacher" / "model").is_dir():
        raise FileNotFoundError(f"{previous}: no teacher model under runs/mod/teacher/model (nor under {holder})")
    copy_teacher(holder, out)
    return RunResult.from_dict(row)


def copy_teacher(source_dir: Path, target_dir: Path) -> None:
    """The teacher model of `source_dir` into `target_dir`, where the configs' relative teacher path finds it."""
    source = source_dir / "runs" / "mod" / "teacher" / "model"
    shutil.copytree(source, target_dir / "runs" / "mod" / "teacher" / "model", dirs_exist_ok=True)


def student_runs(workdir: Path, seed: int, quick: bool, mimic_lm_weight: float | None,
                 control: bool, root: Path, bar: Any = None) -> dict[str, RunResult]:
    """Every student run of one seed on the data at `root`, inside `workdir` (which holds the teacher under
    runs/mod/teacher/model); `bar` (the progress bar over the runs) advances after each."""
    overrides = NO_VALIDATION + (QUICK if quick else []) + seed_overrides(seed) + data_overrides(root)
    mimic_extra = [f"--model.init_args.mimic.lm_weight={mimic_lm_weight}"] if mimic_lm_weight is not None else []
    results: dict[str, RunResult] = {}

    def fit_and_test(name: str, args: list[str]) -> RunResult:
        result = execute(Run(name, args, seed=seed), workdir)
        if bar is not None:
            bar.update()
        return result

    with working_directory(workdir):  # every runs/... path of the configs (and the stage hand-offs) lands here
        for stage in ("mimic_dense", "mimic_sparse", "preference"):
            extra = quick_data(stage == "preference") if quick else preference_domains() if stage == "preference" else []
            if stage.startswith("mimic"):
                extra += mimic_extra
            if stage == "mimic_dense":
                extra += student_size(STUDENT)
            results[stage] = fit_and_test(stage, ["--config", str(config(stage)), *overrides, *extra])
        if quick:
            overrides = overrides + quick_data(False)
        if control:  # as many extra steps as preference took, of the mimic objective instead
            steps = results["preference"].steps
            control_file = control_config(workdir / "configs" / "control.yaml", steps)
            results["control"] = fit_and_test("control", ["--config", str(control_file), *overrides, *mimic_extra,
                                                          f"--trainer.max_steps={steps}"])
        # equal student steps: as many as the distilled student took (also under --quick's overrides)
        steps = results["mimic_dense"].steps
        instruct = baseline_config(config("mimic_dense"), workdir / "configs" / "baseline_instruct.yaml",
                                   "baseline_instruct", "instruct", steps, None)
        results["baseline_instruct"] = fit_and_test("baseline_instruct", ["--config", str(instruct), *overrides,
                                                                          *student_size(STUDENT),
                                                                          f"--trainer.max_steps={steps}"])
        steps = results["mimic_sparse"].steps + results["preference"].steps
        moe = baseline_config(config("mimic_sparse"), workdir / "configs" / "baseline_moe.yaml", "baseline_moe",
                              "moe", steps, "runs/mod/baseline_instruct/model")
        results["baseline_moe"] = fit_and_test("baseline_moe", ["--config", str(moe), *overrides,
                                                                f"--trainer.max_steps={steps}"])
        # the dense student of the sparse one's active size, distilled for as many steps as its three stages
        steps = results["mimic_dense"].steps + results["mimic_sparse"].steps + results["preference"].steps
        dense = derive_config(config("mimic_dense"), workdir / "configs" / "dense_active.yaml", "dense_active", steps,
                              None, lambda c: None)
        results["dense_active"] = fit_and_test("dense_active", ["--config", str(dense), *overrides, *mimic_extra,
                                                                *student_size(DENSE_ACTIVE),
                                                                f"--trainer.max_steps={steps}"])
    return results


def seed_teacher(workdir: Path, seed: int, quick: bool, root: Path) -> RunResult:
    """The teacher of one seed, trained and tested at the seed inside `workdir` (its model in
    runs/mod/teacher/model, where the student configs find it)."""
    quick_args = [*QUICK, *quick_data(False)] if quick else []
    with working_directory(workdir):
        return execute(Run("teacher", ["--config", str(config("teacher")), *NO_VALIDATION, *quick_args,
                                       *seed_overrides(seed), *data_overrides(root)], seed=seed), workdir)


def _seed_runs(out: Path, quick: bool, mimic_lm_weight: float | None, control: bool, root: Path, shared_teacher: bool,
               workdir: Path, seed: int) -> tuple[dict[str, dict[str, Any]], str]:
    """One seed's runs in `workdir` (`seed_directory`: `out` itself for a single seed, with everything under it;
    several get out/seed<N>/): its teacher (`seed_teacher`; `shared_teacher`: the one in `out`, copied beside the
    students), then the student runs, as `map_kept_seeds` keeps them: run name -> its row."""
    if shared_teacher and workdir != out:
        copy_teacher(out, workdir)
    bar = progress(STUDENT_RUNS + control + (not shared_teacher), f"distill runs, seed {seed}")
    try:
        runs = {} if shared_teacher else {"teacher": seed_teacher(workdir, seed, quick, root)}
        bar.update(len(runs))
        runs |= student_runs(workdir, seed, quick, mimic_lm_weight, control, root, bar)
    finally:
        bar.close()
    return {name: asdict(result) for name, result in runs.items()}, ""


STUDENT_RUNS = 6  # mimic_dense, mimic_sparse, preference, baseline_instruct, baseline_moe, dense_active


def run(out: Path, quick: bool = False, mimic_lm_weight: float | None = None, teacher_from: Path | None = None,
        seeds: list[int] | None = None, control: bool = True, command: str | None = None, jobs: int = 1,
        threads: int | None = None) -> dict:
    """All runs (module docstring); `mimic_lm_weight` overrides the mimic stages' `mimic.lm_weight`,
    `teacher_from` reuses the teacher of an earlier output directory for every seed instead of training one per
    seed, `seeds` repeats the runs per seed (`jobs` seeds at a time in processes of their own, `threads` torch
    threads each), `control` adds the extra-steps control."""
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(seeds) if seeds else [0]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds has repeated seeds: {seeds}")
    # resolved here, against the caller's directory: inside working_directory(out) a relative path
    # would be looked up under `out`
    teacher_from = Path(teacher_from).resolve() if teacher_from is not None else None
    command = command or ("python -m lightning_moe.experiments.distill --out DIR" + (" --quick" if quick else "")
                          + (f" --mimic-lm-weight {mimic_lm_weight}" if mimic_lm_weight is not None else "")
                          + (f" --reuse {teacher_from}" if teacher_from is not None else "")
                          + (f" --seeds {' '.join(map(str, seeds))}" if seeds != [0] else "")
                          + ("" if control else " --no-control"))
    env = environment(command)  # command, date, torch threads, versions, git commit: when the run starts
    key = resume_key(env, threads)  # what a rerun of this command on this clean commit may take from this one
    start = time.perf_counter()
    sizes = QUICK_DATA_SIZES if quick else DATA_SIZES
    shared_teacher = teacher_from is not None
    if shared_teacher:  # the earlier output's teacher, at the difficulty it was chosen at
        teacher = reuse_teacher(teacher_from, out)
        settings = json.loads((teacher_from / "results.json").read_text())["protocol"]["settings"]
        if "shapes" not in settings:
            raise ValueError(f"{teacher_from / 'results.json'}: its protocol names no chosen difficulty (settings.shapes):"
                             " written before the difficulty was chosen on val; train a new teacher instead")
    else:
        selection = select_difficulty(out, quick, LADDER[:1] if quick else LADDER, sizes,
                                      SELECTION_SEEDS[:1] if quick else SELECTION_SEEDS, key)
        chosen = selection["chosen"]
        settings = {"difficulty": chosen["setting"], "shapes": chosen["difficulty"], "met": selection["met"],
                    "ladder": selection["tried"]}
    root = generated(out, settings["shapes"], sizes)
    rows = [{**asdict(teacher), "seed": None}] if shared_teacher else []
    # a seed finished by an earlier run of this command on this clean commit is taken from its directory
    finished = map_kept_seeds(out, seeds, functools.partial(_seed_runs, out, quick, mimic_lm_weight, control, root,
                                                            shared_teacher),
                              key, jobs, threads)
    per_seed = {seed: {name: RunResult.from_dict(row) for name, row in finished[seed][0].items()} for seed in seeds}
    for seed in seeds:
        rows += [asdict(r) for r in per_seed[seed].values()]
    declared = protocol(seeds, control, quick)
    declared.settings = settings
    summary = {
        "protocol": declared.as_dict(),
        "environment": env,
        "quick": quick,
        "seeds": seeds,
        "control": control,
        "data_root": str(root),
        "majority_answer": majority_answer(root, QUICK_DOMAINS if quick else DOMAINS),
        "wall_s": time.perf_counter() - start,
        "runs": rows,  # every run of every seed (first a reused teacher, seed None: the one every seed shares)
        "aggregate": aggregate(per_seed),
    }
    summary |= verdicts(summary)
    return write_results(out, summary, results_markdown(summary), command)


def generated(out: Path, shapes: dict[str, Any], sizes: dict[str, int]) -> Path:
    """The shapes set of these `ShapesDifficulty` settings under OUT/data/ (written once; the same settings find the
    same directory)."""
    return generate_shapes(out / "data", ShapesDifficulty(**shapes), seed=0, **sizes)


def chain_steps(quick: bool) -> dict[str, int]:
    """The undistilled student's steps per stage, as the distilled chain's (configs/mod; `--quick`: 2 per stage)."""
    steps = {stage: 2 if quick else effective_config(config(stage))["trainer"]["max_steps"]
             for stage in ("mimic_dense", "mimic_sparse", "preference")}
    return {"instruct": steps["mimic_dense"], "moe": steps["mimic_sparse"] + steps["preference"]}


def undistilled_val(workdir: Path, seed: int, quick: bool, root: Path) -> float:
    """The undistilled student of one selection seed (MoE-tuning's instruct then moe stage, at the distilled chain's
    steps, inside `workdir`): its val primary metric at the end of training."""
    steps = chain_steps(quick)
    common = (QUICK + quick_data(False) if quick else []) + seed_overrides(seed) + data_overrides(root)
    instruct_name, moe_name = f"select_instruct_seed{seed}", f"select_moe_seed{seed}"
    with working_directory(workdir):
        instruct = baseline_config(config("mimic_dense"), workdir / "configs" / f"{instruct_name}.yaml", instruct_name,
                                   "instruct", steps["instruct"], None)
        execute(Run(instruct_name, ["--config", str(instruct), *common, *NO_VALIDATION, *student_size(STUDENT),
                                    f"--trainer.max_steps={steps['instruct']}"], test=False, seed=seed), workdir)
        moe = baseline_config(config("mimic_sparse"), workdir / "configs" / f"{moe_name}.yaml", moe_name, "moe",
                              steps["moe"], f"runs/mod/{instruct_name}/model")
        result = execute(Run(moe_name, ["--config", str(moe), *common, f"--trainer.max_steps={steps['moe']}",
                                        f"--trainer.val_check_interval={steps['moe']}"], test=False, seed=seed), workdir)
    return val_primary(result, QUICK_DOMAINS if quick else DOMAINS)


def val_primary(result: RunResult, domains: tuple[str, ...]) -> float:
    """A run's primary metric on val at the end of training: the mean over the domains of `final_val`."""
    val = final_val(result, list(domains))
    if val is None:
        raise RuntimeError(f"distill: run {result.name} did not validate on every domain of {', '.join(domains)}")
    return sum(val.values()) / len(val)


def rejections(scores: dict[str, Any]) -> list[str]:
    """Why a rung fails the selection rule, on val ({"teacher": its primary metric, "students": selection seed -> the
    undistilled student's, "chance": the majority answer's}); none: it qualifies. The rule: the teacher off the
    ceiling and above chance, the undistilled student at least SELECTION_GAP below it in every selection seed and
    itself neither at ceiling nor at chance (mean over the seeds)."""
    teacher, students = scores["teacher"], scores["students"]
    reasons = [at_ceiling_or_chance("the teacher", [teacher], scores["chance"])]
    short = [seed for seed, value in students.items() if teacher - value < SELECTION_GAP - TOLERANCE]
    if short:
        reasons.append(f"the undistilled student less than {100 * SELECTION_GAP:.0f} points below the teacher "
                       f"(seed {', '.join(short)})")
    reasons.append(at_ceiling_or_chance("the undistilled student", list(students.values()), scores["chance"]))
    return [r for r in reasons if r]


def selection_teacher_val(workdir: Path, quick: bool, root: Path) -> float:
    """A selection rung's teacher (trained inside `workdir` at its config's seed, validated at its end; it only
    chooses the rung, the reported seeds train their own): its val primary metric."""
    quick_args = [*QUICK, *quick_data(False), "--trainer.val_check_interval=2"] if quick else []
    with working_directory(workdir):
        result = execute(Run("teacher", ["--config", str(config("teacher")), *quick_args, *data_overrides(root)]),
                         workdir)
    return val_primary(result, QUICK_DOMAINS if quick else DOMAINS)


def select_difficulty(out: Path, quick: bool, ladder: tuple[dict[str, Any], ...], sizes: dict[str, int],
                      seeds: list[int], key: dict[str, Any] | None = None) -> dict[str, Any]:
    """The data's difficulty, chosen on val (`protocol.select_first` over `ladder`, easiest first): at each rung its
    set (`generated`), a teacher (`selection_teacher_val`, in OUT/selection/d<i>/) and the undistilled student in
    every selection seed; the first rung `rejections` lets through is chosen, else the last. Each of those scores
    is `kept` in OUT/selection/d<i>/kept/ under `key` (the run's `resume_key`): a selection stopped part-way and
    started again with the same command on the same commit trains only what it had not. Returns `select_first`'s
    answer."""
    domains = QUICK_DOMAINS if quick else DOMAINS

    def measure(rung: dict[str, Any]) -> dict[str, Any]:
        root, workdir = generated(out, rung["difficulty"], sizes), out / "selection" / f"d{rung['level']}"
        workdir.mkdir(parents=True, exist_ok=True)
        where = f"the selection at {rung['setting']}"
        teacher = kept(workdir / "kept" / "teacher.json", key, lambda: selection_teacher_val(workdir, quick, root),
                       f"{where}: the teacher's val score")
        students = {str(seed): kept(workdir / "kept" / f"undistilled_seed{seed}.json", key,
                                    functools.partial(undistilled_val, workdir, seed, quick, root),
                                    f"{where}: the undistilled student's val score, seed {seed}")
                    for seed in seeds}
        return {"teacher": teacher, "students": students, "chance": majority_answer(root, domains, "val")}

    rungs = [{"setting": setting_words(shapes, "data/shapes"), "level": i, "difficulty": shapes}
             for i, shapes in enumerate(ladder)]
    return select_first(progress(rungs, "distill: choosing the data's difficulty on val"), measure,
                        lambda rung, scores: rejections(scores))


SELECTION_RULE = (f"the first rung at which, on val, the teacher is off the ceiling (100 %) and above chance, and the "
                  f"undistilled student (MoE-tuning at the distilled chain's steps) stays at least "
                  f"{100 * SELECTION_GAP:.0f} points below the teacher in every selection seed and is itself at neither "
                  "ceiling nor chance, all on the primary metric")


def protocol(seeds: list[int], control: bool, quick: bool = False) -> Protocol:
    return Protocol(
        question="Does distillation from a dense teacher (mimic, then preference) give a better sparse student than "
                 "MoE-tuning at equal steps, does the preference stage help beyond as many more mimic steps, and "
                 "does the sparse student beat a dense one of its active size?",
        seeds=list(seeds), selection_split="val", reported_split="test",
        selection="the data's difficulty, by the ladder and the rule below, on val with the selection seeds ("
                  + ", ".join(map(str, SELECTION_SEEDS[:1] if quick else SELECTION_SEEDS)) + "); every other setting "
                  "is configs/mod/*.yaml's, the students at half the teacher's width, each seed with its own teacher "
                  "(trained at the seed); the baseline, the control and the "
                  "dense student of the active size take their step counts from the distilled runs (equal steps)"
                  + ("" if control else "; the control is off (--no-control)") + ".",
        difficulties=[setting_words(shapes, "data/shapes") for shapes in (LADDER[:1] if quick else LADDER)],
        difficulty_rule=SELECTION_RULE + " (the shapes set generated with pope_cooccur, whose test split asks about "
                        "squares without circles: hallucination shows in its POPE precision and yes-ratio)",
        primary="mean test exact match over the domains",
        comparisons=[Comparison(a, b, MARGIN, claim) for a, b, claim in COMPARISONS
                     if control or b != "control"],
        gates=[NO_DISCRIMINATING_SETTING,
               "the teacher's mean less than the margin above the undistilled student's (nothing to distil)",
               "the distilled or the undistilled student at ceiling or chance"],
        verdict_rule="each comparison on its own; the POPE scores are reported beside them (no verdict).")


# (a, b, what a confirmed a - b shows) on the primary metric
COMPARISONS = (("preference", "baseline_moe", "distillation gives a better sparse student than MoE-tuning"),
               ("preference", "control", "the preference stage helps beyond as many more mimic steps"),
               ("preference", "dense_active", "the sparse student beats a dense one of its active size"))
PRIMARY = "test/exact_match"


def majority_answer(root: Path, domains: tuple[str, ...] = DOMAINS, split: str = "test") -> float:
    """The primary metric of always giving each domain's most frequent answer of `split`, mean over the domains."""
    chance = majority_answers(root, domains, split)
    return sum(chance.values()) / len(chance)


def verdicts(summary: dict) -> dict[str, Any]:
    """The comparisons (`COMPARISONS`) over the seeds, each a paired difference on the primary metric with its
    95 % interval and `statistics.decide`'s verdict against MARGIN, with the gates."""
    values = {name: metrics[PRIMARY]["values"] for name, metrics in summary["aggregate"].items() if PRIMARY in metrics}
    teacher_stat = _stat(summary, "teacher", PRIMARY)
    teacher = None if teacher_stat is None else teacher_stat["mean"]
    failed = []
    if summary.get("protocol", {}).get("settings", {}).get("met") is False:
        failed.append(NO_DISCRIMINATING_SETTING)
    if teacher is not None and "baseline_moe" in values and teacher - sum(values["baseline_moe"]) / len(
            values["baseline_moe"]) < MARGIN:
        failed.append(f"teacher ({teacher:.3f}) less than the margin above the undistilled student: nothing to distil")
    chance = summary["majority_answer"]
    failed += [at_ceiling_or_chance(label, values[name], chance)
               for name, label in (("preference", "the distilled student"), ("baseline_moe", "the undistilled student"))
               if name in values]
    failed = [f for f in failed if f]
    differences, decided = {}, {}
    for a, b, _ in COMPARISONS:
        if a in values and b in values:
            key = f"{a} - {b}"
            differences[key] = paired_difference(values[a], values[b])
            decided[key] = decide(differences[key], MARGIN, failed)
    return {"majority_answer": chance, "differences": differences, "gates": failed, "verdicts": decided}


def aggregate(per_seed: dict[int, dict[str, RunResult]]) -> dict[str, dict[str, dict[str, float]]]:
    """run name -> test metric -> mean, min, max, standard error and per-seed values over the seeds."""
    names = next(iter(per_seed.values())).keys()
    table: dict[str, dict[str, dict[str, float]]] = {}
    for name in names:
        keys = set.intersection(*(set(results[name].metrics) for results in per_seed.values()))
        table[name] = {}
        for key in sorted(keys):
            table[name][key] = seed_stat([results[name].metrics[key] for results in per_seed.values()])
    return table


def _cell(value: float | None, fmt: str = "{:.3f}") -> str:
    return "" if value is None else fmt.format(value)


ROW_NAMES = {
    "teacher": "teacher (dense, 4 layers, width 128)",
    "mimic_dense": "student after mimic_dense",
    "mimic_sparse": "student after mimic_sparse",
    "preference": "**distilled student** (after preference)",
    "control": "control: mimic_sparse + as many more mimic steps",
    "baseline_instruct": "undistilled student, instruct",
    "baseline_moe": "**undistilled student** (instruct + moe)",
    "dense_active": "dense student of the sparse student's active size (distilled)",
}
POPE_KEYS = ("accuracy", "f1", "yes_ratio")
POPE_LABELS = {"accuracy": "accuracy", "f1": "F1", "yes_ratio": "yes-ratio"}


def _stat(summary: dict, name: str, key: str) -> dict[str, float] | None:
    """{mean, min, max, values} of a test metric of a run over the seeds (a reused teacher: its one value)."""
    if name == "teacher" and name not in summary["aggregate"]:
        value = next(r for r in summary["runs"] if r["name"] == "teacher")["metrics"].get(key)
        return None if value is None else {"mean": value, "min": value, "max": value, "values": [value]}
    return summary["aggregate"].get(name, {}).get(key)


def _spread_cell(stat: dict[str, float] | None) -> str:
    """One value, or over several seeds `mean (min-max)`."""
    return spread(stat)


def verdict_lines(summary: dict) -> list[str]:
    """What the comparisons say, in words: each on the primary metric with its 95 % interval over seeds and its
    verdict (`verdicts`), the gates; beside them (no verdict) preference's POPE change and POPE accuracy against
    the control."""
    lines = []
    claims = {f"{a} - {b}": claim for a, b, claim in COMPARISONS}
    for key, diff in summary.get("differences", {}).items():
        lines.append(f"- {claims[key]}? Mean test exact match, {key}: {interval_words(diff)}; margin {MARGIN:+.3f}: "
                     f"**{summary['verdicts'][key]}**.")
    if summary.get("differences"):
        lines.append(f"- Gates: {'; '.join(summary['gates']) or 'all passed'}.")
    pope = {name: {k: _stat(summary, name, f"test/pope/pope_{k}") for k in POPE_KEYS}
            for name in ("mimic_sparse", "preference", "control")}
    before, after, control = pope["mimic_sparse"], pope["preference"], pope["control"]
    if all(before.values()) and all(after.values()):
        lines.append("- Preference distillation, " + ", ".join(
            f"POPE {POPE_LABELS[k]} {before[k]['mean']:.3f} -> {after[k]['mean']:.3f}" for k in POPE_KEYS) + ".")
    if after["accuracy"] and control["accuracy"]:
        steps = [r["steps"] for r in summary["runs"] if r["name"] == "control"]
        diff = paired_difference(after["accuracy"]["values"], control["accuracy"]["values"])
        lines.append(f"- POPE accuracy, preference - control ({steps[0]} more mimic_sparse steps from the same "
                     f"checkpoint instead of the preference steps): {interval_words(diff)} (reported, no verdict).")
    return lines


def results_markdown(summary: dict) -> str:
    seeds = summary.get("seeds", [0])
    names = list(dict.fromkeys(["teacher", *summary["aggregate"]]))
    header = ["model", *DOMAINS, "mean", "POPE acc", "POPE F1", "yes-ratio", "co-occurrence precision",
              "co-occurrence yes-ratio", "activated params", "total params"]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for name in names:
        row = next(r for r in summary["runs"] if r["name"] == name)  # parameter counts: the same for every seed
        keys = ([f"test/{d}/exact_match" for d in DOMAINS] + ["test/exact_match"] + [f"test/pope/pope_{k}" for k in POPE_KEYS]
                + ["test/pope_cooccur/pope_precision", "test/pope_cooccur/pope_yes_ratio"])
        cells = [_spread_cell(_stat(summary, name, k)) for k in keys]
        cells += [f"{row['params_activated']:,}", f"{row['params_total']:,}"]
        lines.append(f"| {ROW_NAMES.get(name, name)} | " + " | ".join(cells) + " |")
    stage_lines = ["| run | seed | method | stage | steps | median step (s) | peak memory (MB) | memory measured as | wall (s) |",
                   "|---|---:|---|---|---:|---:|---:|---|---:|"]
    for run in summary["runs"]:
        seed = "" if run.get("seed") is None else str(run["seed"])
        stage_lines.append(f"| {run['name']} | {seed} | {run['method']} | {run['stage']} | {run['steps']} | "
                           f"{_cell(run['step_time_s'])} | {_cell(run['peak_memory_mb'], '{:.0f}')} | "
                           f"{run['memory_kind']} | {run['wall_s']:.0f} |")
    spread = ("" if len(seeds) == 1 else
              f" Rows: mean over seeds {', '.join(map(str, seeds))} (min-max in brackets)"
              + ("; the teacher is one run, reused." if "teacher" not in summary["aggregate"] else "."))
    return "\n".join([
        # the command, date and commit are in the footer (`write_results`) and in the report's stamp
        f"# Does the distilled sparse student beat its controls? ({summary['wall_s'] / 60:.1f} min of wall time)",
        "",
        Protocol.from_dict(summary["protocol"]).markdown() if summary.get("protocol") else "",
        "Test split, exact match per domain (greedy generation), mean over domains, POPE metrics on `pope`; on "
        "`pope_cooccur` (half its test asks about a square without a circle, the bait) POPE precision and yes-ratio: "
        "the co-occurrence hallucination." + spread,
        "",
        *lines,
        "",
        *verdict_lines(summary),
        "",
        "Per run: training steps, median step time, peak memory (CPU: peak resident set of the whole process).",
        "",
        *stage_lines,
        "",
    ])


def build_parser() -> argparse.ArgumentParser:
    parser = experiment_parser(__doc__.split("\n\n")[0],
                               reuse="an earlier output directory of this experiment whose teacher is reused by "
                               "every seed (copied, its results row kept) instead of training one per seed")
    parser.add_argument("--teacher-from", dest="reuse", type=Path, help="the former name of --reuse")
    parser.add_argument("--mimic-lm-weight", type=float, default=None,
                        help="add the student's own LM loss with this weight in the mimic stages (kd_lm)")
    parser.add_argument("--control", action=argparse.BooleanOptionalAction, default=True,
                        help="the control for preference: as many extra mimic_sparse steps from the same checkpoint")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(build_parser(), argv)
    summary = run(args.out, args.quick, args.mimic_lm_weight, args.reuse, args.seeds, args.control,
                  command_line("lightning_moe.experiments.distill", argv), args.jobs, args.threads)
    print((args.out / "results.md").read_text())
    return summary


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

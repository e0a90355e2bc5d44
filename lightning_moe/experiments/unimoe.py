"""Do modality-specific experts help? (Uni-MoE's question)

    python -m lightning_moe.experiments.unimoe --out runs/unimoe_exp [--quick] [--seeds 0 1 2] [--jobs N] [--threads N]

Through the CLI's classes (`lightning_moe.cli.main` with the shipped configs/unimoe/ files plus a per-run
config written to OUT/configs/):

1. stage 1 (configs/unimoe/align.yaml) on the audio, video and cross-modal mixture, with video frames kept
   in order (`concat`, the shipped default), and at the chosen difficulty also averaged (`mean`, the
   reference): the video pooling comparison (`motion` needs frame order), at the first selection seed
   (`Plan.selection_seeds`). The data's difficulty is chosen on val by the selection seeds' stage 1
   (`select_difficulty`): the rungs of `Plan.difficulties` in order (the shipped data/media, then
   `MediaDifficulty` settings generated under OUT/data/ by `generate_media`), stage 1 trained at each in every
   selection seed, the first at which, in every selection seed, stage 1 is not already at ceiling on most
   domains and has learnt something of each modality (`selection_rejections`) is used;
2. per seed, stage 1 with video `concat` at the chosen difficulty, trained at the seed: the seed's starting
   point, where all its arms start (a starting point trained once would hold every seed's interval to one draw
   of it, which another float order changes); each stage-1 run lives in OUT/base/stage1-<settings>/ (the seed
   among them), reused by a later run with the same settings (a selection seed's by that seed);
3. per seed, stage 2: one run per modality from the `concat` stage-1 output (experts.yaml,
   experts_video.yaml, experts_image.yaml);
4. per seed, at equal steps on the mixture, from the seed's stage-1 output:
   - Uni-MoE: stage 3 (moe.yaml), each expert from its modality's stage-2 FFN (+ the dense FFN);
   - copies: the same MoE recipe with every expert a copy of the stage-1 FFN (MoE-LLaVA's upcycling);
   - dense: the same LoRA (r=8, alpha=16 on attention and the MLP projections) without experts;
   - single stage: the copies' MoE recipe in one stage from the same stage-1 model, training what stages 2
     and 3 train between them (the FFNs, now the experts, the router and the LoRA) for as many steps as
     they take together (does the progressive training help?).

Every arm is tested on every domain's test split (exact match). Writes OUT/results.json, OUT/results.md
(the protocol; per-domain accuracy per arm, mean and range over seeds; the paired differences behind the
verdict; the modality x expert routing of the MoE arms, in numbers; the pooling comparison) and the verdict
by `verdict` (rules in code). Training samples are checked for existence, not decoded, at set-up
(`defer_train_decoding`: the shipped data is checked by its tests); evaluation splits are decoded.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from ..data.synthetic_media import MediaDifficulty, generate_media
from ..paths import resolve_data_path, shipped_path
from . import (Run, RunResult, command_line, execute, experiment_parser, final_val, majority_answers, map_seeds_until,
               not_run, parse_args, progress, run_seeds, save_pretrained_callback, validation_schedule, write_run_config)
from .protocol import NO_DISCRIMINATING_SETTING, SELECTION_SEEDS, Comparison, Protocol, select_first, setting_words
from .statistics import at_ceiling_or_chance, curve_stat, decide, interval_words, paired_difference, seed_stat, spread

DATA_ROOT = "data/media"
AUDIO, VIDEO, CROSS = ("beeps", "pitch", "longer"), ("frames", "motion"), ("beeps_shapes",)
DOMAINS = (*AUDIO, *VIDEO, *CROSS)
ARMS = ("unimoe", "copies", "dense", "single_stage")
BASE_RUNS = ("align_concat", "align_mean")
LABELS = {"unimoe": "Uni-MoE (modality experts)", "copies": "MoE, experts copies of one FFN",
          "dense": "dense + LoRA (no experts)",
          "single_stage": "one stage: the MoE recipe from stage 1, experts + router + LoRA (equal steps)",
          "align_concat": "stage 1, video concat (the seed's own: its arms' start)",
          "align_mean": "stage 1, video mean (the first selection seed's)"}
# the primary comparisons' margin: 2 points of the mean accuracy over 6 domains x 200 test samples
MARGIN = 0.02
CEILING = 0.99  # a domain at 99 % val exact match or more leaves the later stages nothing to show on it
LEARNT_MARGIN = 0.05  # a domain stage 1 has learnt something of: this far above its majority answer on val


@dataclass
class Plan:
    # stage 1: 600 steps of 64 learn every audio and video domain of the shipped mixture; 300 learn none of the
    # video ones (measured, 2 December 2026)
    align_steps: int = 600
    expert_steps: int = 80  # stage 2, per modality
    steps: int = 160  # every stage-3 arm
    batch_size: int = 64
    eval_samples: int = 200  # test samples per domain
    seed: int = 0  # of stage 1 and of every later run of the seed
    # of the stage-1 runs the difficulty selection reads (apart from the reported seeds; the first also trains the
    # pooling comparison's): which domains stage 1 learns varies with the seed, so one seed says too little
    selection_seeds: list[int] = field(default_factory=lambda: list(SELECTION_SEEDS))
    train_samples: int | None = None  # the first N train samples of each domain (None: all)
    curve_points: int = 4  # validations of each stage-3 arm while training (its learning curve), the last at its end
    # the ladder `select_difficulty` climbs on val (easiest first): None the shipped data/media, else
    # `MediaDifficulty` settings generated under OUT/data/ (data_seed, data_train / data_eval samples, data_pools)
    difficulties: list[dict[str, Any] | None] = field(default_factory=lambda: [
        None, {"audio_noise": 0.01}, {"pitch_ratio": 2.0, "audio_noise": 0.05}, {"pitch_ratio": 1.5, "audio_noise": 0.1}])
    difficulty: dict[str, Any] | None = None  # the chosen rung's (None: the shipped data/media)
    data_root: str | None = None
    data_seed: int = 0
    data_train: int = 2000
    data_eval: int = 200
    data_pools: dict[str, int] | None = None  # distinct items per split (None: the generator's)
    discriminating: bool | None = None  # what the selection found (None: no selection yet)

    def base_signature(self) -> dict[str, Any]:
        signature = {"align_steps": self.align_steps, "batch_size": self.batch_size, "eval_samples": self.eval_samples,
                     "seed": self.seed}
        if self.difficulty is not None:  # generated data (None: the shipped data/media)
            signature["data"] = {"difficulty": self.difficulty, "seed": self.data_seed, "train": self.data_train,
                                 "eval": self.data_eval, "pools": self.data_pools}
        return signature | ({"train_samples": self.train_samples} if self.train_samples else {})


# one rung: the defaults generated at a tiny size
QUICK = Plan(align_steps=2, expert_steps=2, steps=2, batch_size=4, eval_samples=4, train_samples=32, curve_points=2,
             selection_seeds=SELECTION_SEEDS[:1], difficulties=[{}], data_train=32, data_eval=4,
             data_pools={"train": 8, "val": 4, "test": 4})


def with_data(plan: Plan, difficulty: dict[str, Any] | None, directory: Path) -> Plan:
    """The plan on the data of `difficulty`: None the shipped data/media; else the set `generate_media` writes once
    under `directory` for these settings and the plan's data sizes (the same plan finds the same directory)."""
    if difficulty is None:
        return replace(plan, difficulty=None, data_root=None)
    root = generate_media(directory, MediaDifficulty(**difficulty), seed=plan.data_seed, n_train=plan.data_train,
                          n_eval=plan.data_eval, pools=plan.data_pools)
    return replace(plan, difficulty=dict(difficulty), data_root=str(root))


def data_root(plan: Plan) -> Path:
    return Path(plan.data_root) if plan.data_root else resolve_data_path(DATA_ROOT)


def difficulty_words(difficulty: dict[str, Any] | None) -> str:
    return setting_words(difficulty, "data/media")


def rejections(val: dict[str, float], chance: dict[str, float]) -> list[str]:
    """Why a rung fails the selection rule, from stage 1's (video concat: the arms' start) val exact match per domain
    and each domain's majority answer on val (`chance`); none: it qualifies. The rule: stage 1 at ceiling (CEILING
    or more) on at most half of the domains, and LEARNT_MARGIN above chance on at least one domain of each
    modality (audio, video): every modality's expert starts from a model that has learnt something of it."""
    reasons = []
    at_ceiling = [d for d, v in val.items() if v >= CEILING]
    if 2 * len(at_ceiling) > len(val):
        reasons.append(f"stage 1 at ceiling on {len(at_ceiling)} of {len(val)} domains ({', '.join(at_ceiling)})")
    for modality, domains in (("audio", AUDIO), ("video", VIDEO)):
        if not any(val[d] - chance[d] >= LEARNT_MARGIN - 1e-9 for d in domains):
            reasons.append(f"stage 1 at chance on every {modality} domain ({', '.join(domains)})")
    return reasons


def selection_rejections(scores: dict[str, Any]) -> list[str]:
    """`rejections` in every selection seed ({"val": seed -> stage 1's val exact match per domain, "chance": each
    domain's majority answer on val}), each reason naming its seed; none: the rung qualifies."""
    return [f"seed {seed}: {reason}" for seed, val in scores["val"].items()
            for reason in rejections(val, scores["chance"])]


def stage1_val(plan: Plan, base: Path, seed: int) -> dict[str, float]:
    """Stage 1 with video `concat` at `seed` (`train_stage1` under `base`): its val exact match per domain.
    Module-level: `map_seeds_until` runs the selection seeds in processes of their own."""
    row = train_stage1(replace(plan, seed=seed), base, ("concat",))["align_concat"]
    val = final_val(row, list(DOMAINS))
    if val is None:
        raise RuntimeError(f"unimoe: stage 1 of seed {seed} in {stage1_directory(replace(plan, seed=seed), base)} "
                           "did not validate on every domain")
    return val


def select_difficulty(plan: Plan, out: Path, jobs: int = 1, threads: int | None = None) -> dict[str, Any]:
    """The data's difficulty, chosen on val (`protocol.select_first` over `plan.difficulties`, easiest first): at each
    rung its data (`with_data`, under OUT/data/) and stage 1 with video `concat` trained on it (`stage1_val`, under
    OUT/base/, where a rerun finds it) in every selection seed, in rounds of `jobs` processes (`threads` torch
    threads each); the rule holds in every seed, so a round with a seed that fails it rejects the rung without the
    later rounds. The first rung `selection_rejections` lets through is chosen, else the last; there stage 1 with
    video `mean` is trained too, at the first selection seed. Returns {"plan": the plan at the chosen rung,
    "stage1": the first selection seed's stage-1 rows there, "met", "tried"}."""
    plans: dict[int, Plan] = {}
    seeds = plan.selection_seeds

    def measure(rung: dict[str, Any]) -> dict[str, Any]:
        plans[rung["level"]] = at_rung = with_data(plan, rung["difficulty"], out / "data")
        chance = majority_answers(data_root(at_rung), DOMAINS, "val", plan.eval_samples)
        val = map_seeds_until(functools.partial(stage1_val, at_rung, out / "base"), seeds,
                              lambda measured: bool(selection_rejections({"val": measured, "chance": chance})),
                              jobs, threads)
        return {"val": {str(seed): v for seed, v in val.items()}, "chance": chance}

    def judged(rung: dict[str, Any], scores: dict[str, Any]) -> list[str]:
        return [*selection_rejections(scores), *not_run(seeds, scores["val"])]

    rungs = [{"setting": difficulty_words(d), "level": i, "difficulty": d} for i, d in enumerate(plan.difficulties)]
    chosen = select_first(progress(rungs, "unimoe: choosing the data's difficulty on val"), measure, judged)
    level = chosen["chosen"]["level"]
    # the pooling comparison: both poolings at the first selection seed (its concat run is the selection's)
    stage1 = train_stage1(replace(plans[level], seed=seeds[0]), out / "base", ("concat", "mean"))
    return {"plan": replace(plans[level], seed=plan.seed, discriminating=chosen["met"]), "stage1": stage1,
            "met": chosen["met"], "tried": chosen["tried"]}


SELECTION_RULE = (f"the first rung at which, in every selection seed, stage 1 (video concat, the arms' start) is at "
                  f"ceiling "
                  f"(>= {100 * CEILING:.0f} % val exact match) on at most half of the domains, so that the later stages "
                  f"have something to show on most of them, and at least {100 * LEARNT_MARGIN:.0f} points above the "
                  "majority answer on one domain of each modality (audio, video), so that every modality's expert "
                  "starts from a model that has learnt something of it")


def protocol(seeds: list[int], plan: Plan) -> Protocol:
    return Protocol(
        question="Do modality-specific experts (each initialised from a dense FFN trained on one modality) beat "
                 "experts that are copies of one FFN, and a dense model with the same LoRA, at equal steps? And does "
                 "the progressive training after alignment (stage 2's dense FFN per modality, then stage 3) beat "
                 "training the MoE in one stage from the aligned model at equal steps?",
        seeds=list(seeds), selection_split="val", reported_split="test",
        selection=f"the data's difficulty, by the ladder and the rule below, on val with the selection seeds "
                  f"({', '.join(map(str, plan.selection_seeds))}); every other setting is "
                  f"configs/unimoe/*.yaml's; stage 1 is trained per seed, at the seed, and that seed's arms train "
                  "for the same steps from it.",
        difficulties=[difficulty_words(d) for d in plan.difficulties],
        difficulty_rule=SELECTION_RULE,
        primary="mean test exact match over the domains",
        comparisons=[Comparison("unimoe", arm, MARGIN, claim) for arm, claim in BASELINES.items()],
        gates=[NO_DISCRIMINATING_SETTING, "Uni-MoE or a baseline arm at ceiling or chance"],
        verdict_rule="each comparison on its own; the verdict on modality-specific experts is that of the comparisons "
                     "with copies and dense when they agree, else inconclusive; the single-stage comparison answers "
                     "whether the progressive training helps.")


def _config(plan: Plan, out: Path, name: str, steps: int, model: dict[str, Any], callbacks: list[dict[str, Any]],
            seed: int, data: dict[str, Any] | None = None, validations: int = 0, media: bool = True) -> Path:
    """The per-run overrides on top of a shipped config (`write_run_config`), on the plan's media data (`media`
    False: the shipped config's own, data/shapes for the image expert); `validations`: validate on val that many
    times while training (the last at its end), else never."""
    return write_run_config(
        out, name, seed, steps, validation_schedule(steps, validations), model,
        {"init_args": {**({"root": plan.data_root} if plan.data_root and media else {}),
                       "batch_size": plan.batch_size, "eval_batch_size": 200, "seed": seed,
                       "max_eval_samples_per_domain": plan.eval_samples, "defer_train_decoding": True,
                       "max_train_samples_per_domain": plan.train_samples, **(data or {})}},
        callbacks)


def modality_routing(cli: Any) -> dict[str, Any]:
    """The test split's modality x expert routing shares per MoE layer (RoutingStatistics' heat maps, as numbers)."""
    from ..callbacks import RoutingStatistics

    found = [c for c in cli.trainer.callbacks if isinstance(c, RoutingStatistics)]
    return {"modality_routing": found[0].modality_shares.get("test", {})} if found else {}


def _run(shipped: str, config: Path, name: str, out: Path, seed: int, test: bool = True) -> RunResult:
    run = Run(name, ["--config", str(shipped_path(f"configs/{shipped}")), "--config", str(config)],
              label=LABELS.get(name, name), seed=seed, test=test)
    return execute(run, out, inspect=modality_routing)


def stage1_directory(plan: Plan, base: Path) -> Path:
    """Where stage 1 for this plan's stage-1 settings (`Plan.base_signature`) lives under `base`: one directory per
    setting, so that every rung the selection tried stays reusable."""
    digest = hashlib.sha256(json.dumps(plan.base_signature(), sort_keys=True).encode()).hexdigest()[:12]
    return base / f"stage1-{digest}"


def train_stage1(plan: Plan, base: Path, poolings: tuple[str, ...] = ("concat", "mean")) -> dict[str, RunResult]:
    """The stage-1 runs with these video poolings, each trained with `plan.seed` in `stage1_directory` and reused
    when it already holds the run."""
    directory, signature = stage1_directory(plan, base), plan.base_signature()
    saved = directory / "results.json"
    stored = json.loads(saved.read_text())["runs"] if saved.is_file() else {}
    results: dict[str, RunResult] = {}
    # a config's `encoders` mapping replaces the shipped one whole: the shipped one, with the video pooling changed
    shipped = yaml.safe_load(shipped_path("configs/unimoe/align.yaml").read_text())
    encoders = shipped["model"]["init_args"]["backbone"]["encoders"]
    for pooling in poolings:
        name = f"align_{pooling}"
        if name not in stored:
            backbone = {"encoders": {**encoders, "video": {**encoders["video"], "pooling": pooling}}}
            config = _config(plan, directory, name, plan.align_steps, {"backbone": backbone},
                             [save_pretrained_callback(directory / "models" / name)], plan.seed, validations=1)
            stored[name] = asdict(_run("unimoe/align.yaml", config, name, directory, plan.seed))
            saved.write_text(json.dumps({"plan": signature, "runs": stored}, indent=2))
        results[name] = RunResult.from_dict(stored[name])
    return results


def run(out: Path, plan: Plan, bases: Path, pooling: dict[str, RunResult]) -> tuple[dict[str, Any], str]:
    """One seed (`plan.seed`) in `out`: its stage 1 (`train_stage1` under `bases`, OUT/base), the stage-2 runs and
    the stage-3 arms from it; `pooling`: the first selection seed's stage 1 with video mean, its row in the tables."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    models = out / "models"
    results: dict[str, RunResult] = train_stage1(plan, bases, ("concat",)) | {"align_mean": pooling["align_mean"]}
    bar = progress(7, f"unimoe runs, seed {plan.seed}")
    start_model = str(stage1_directory(plan, bases) / "models" / "align_concat")
    for modality, shipped in (("audio", "experts.yaml"), ("video", "experts_video.yaml"), ("image", "experts_image.yaml")):
        name = f"experts_{modality}"
        config = _config(plan, out, name, plan.expert_steps, {"backbone": {"pretrained": start_model}},
                         [save_pretrained_callback(models / name)], plan.seed, media=modality != "image")
        results[name] = _run(f"unimoe/{shipped}", config, name, out, plan.seed, test=False)
        bar.update()
    routing = [{"class_path": "lightning_moe.callbacks.RoutingStatistics"}]
    experts = {m: str(models / f"experts_{m}") for m in ("image", "audio", "video")}
    arms = {
        "unimoe": ("unimoe/moe.yaml", {"backbone": {"pretrained": start_model}, "experts": experts}, routing),
        "copies": ("unimoe/moe.yaml", {"backbone": {"pretrained": start_model}, "experts": {},
                                       "moe": {"experts": ["dense", "dense", "dense", "dense"]}}, routing),
        "dense": ("mole/lora.yaml",
                  {"backbone": {"pretrained": start_model}, "pope_domains": [],
                   "lora": {"r": 8, "alpha": 16.0, "dropout": 0.0, "layers": "all",
                            "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
                   "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 5.0e-4, "weight_decay": 0.0}}},
                  []),
    }
    # one stage from the same stage-1 model: the MoE recipe with copies of its FFN, training what stages 2 and 3
    # train between them (the FFNs, here the experts; the router; the LoRA), for as many steps as they take together
    arms["single_stage"] = ("unimoe/moe.yaml",
                            {"backbone": {"pretrained": start_model}, "experts": {},
                             "moe": {"experts": ["dense", "dense", "dense", "dense"]},
                             "trainable": ["mlp", "router", "adapters"]}, routing)
    steps = {arm: plan.steps for arm in arms} | {"single_stage": 3 * plan.expert_steps + plan.steps}
    # lora.yaml reads data/shapes: the dense arm gets the mixture's data options explicitly
    media = {"root": plan.data_root or DATA_ROOT, "tokenizer": "data/media_tokenizer", "domains": None, "audio_chunk_seconds": 1.0,
             "audio_max_chunks": 1, "video_num_frames": 4}
    for arm, (shipped, model, callbacks) in arms.items():
        config = _config(plan, out, arm, steps[arm], model, callbacks, plan.seed, media if arm == "dense" else None,
                         validations=plan.curve_points)
        results[arm] = _run(shipped, config, arm, out, plan.seed)
        bar.update()
    bar.close()
    summary = summarise(plan, results)
    summary["seconds"] = time.perf_counter() - start
    return summary, seed_table(summary)


def accuracy(result: RunResult) -> dict[str, float]:
    return {d: result.metrics[f"test/{d}/exact_match"] for d in DOMAINS if f"test/{d}/exact_match" in result.metrics}


def summarise(plan: Plan, results: dict[str, RunResult]) -> dict[str, Any]:
    acc = {name: accuracy(r) for name, r in results.items() if r.metrics}
    share = {m: results["unimoe"].metrics.get(f"test/routing/{m}_own_expert_share")
             for m in ("image", "audio", "video")}
    return {"plan": asdict(plan), "runs": {n: asdict(r) for n, r in results.items()}, "accuracy": acc,
            "mean": {row: sum(acc[row].values()) / len(acc[row]) for row in (*ARMS, *BASE_RUNS)},
            "own_expert_share": share,
            # the gates' chance level: the mean over the domains of always giving the most frequent answer
            "chance": sum(chance := majority_answers(data_root(plan), DOMAINS, "test",
                                                     plan.eval_samples).values()) / len(DOMAINS),
            "modality_routing": {arm: results[arm].details.get("modality_routing", {}) for arm in ("unimoe", "copies")}}


def seed_table(summary: dict[str, Any]) -> str:
    """One seed's per-domain accuracies (%)."""
    lines = ["| run | " + " | ".join(DOMAINS) + " | mean |", "|---" * (len(DOMAINS) + 2) + "|"]
    for row in (*ARMS, *BASE_RUNS):
        cells = [f"{100 * summary['accuracy'][row][d]:.1f}" if d in summary["accuracy"][row] else "-" for d in DOMAINS]
        lines.append(f"| {LABELS[row]} | " + " | ".join(cells) + f" | {100 * summary['mean'][row]:.1f} |")
    return "\n".join(lines)


# baseline arm -> what Uni-MoE beating it would show
BASELINES = {"copies": "experts initialised per modality beat experts that are copies of one FFN",
             "dense": "modality experts beat a dense model with the same LoRA",
             "single_stage": "progressive training (stages 2 and 3) beats one MoE stage at equal steps"}
QUESTION = ("copies", "dense")  # the comparisons the verdict on "modality-specific experts help" rests on


def verdicts(means: dict[str, list[float]], chance: float, met: bool = True) -> dict[str, Any]:
    """The protocol's rule: per baseline arm, Uni-MoE's mean test accuracy minus the arm's over seeds (paired,
    95 % interval) against MARGIN (`statistics.decide`), inconclusive when an arm sits at ceiling or chance;
    the verdict on "modality-specific experts help" is its comparisons' (`QUESTION`) when they agree, else
    inconclusive; every verdict is inconclusive when no difficulty qualified on val (`met` False). A baseline
    missing from `means` (results without the arm) is left out."""
    arms = [arm for arm in BASELINES if arm in means]
    own = {arm: at_ceiling_or_chance(LABELS[arm], means[arm], chance) for arm in ("unimoe", *arms)}
    diffs = {arm: paired_difference(means["unimoe"], means[arm]) for arm in arms}
    chosen = None if met else NO_DISCRIMINATING_SETTING
    per_arm = {arm: decide(d, MARGIN, [chosen, own["unimoe"], own[arm]]) for arm, d in diffs.items()}
    distinct = {per_arm[arm] for arm in QUESTION}
    verdict = distinct.pop() if len(distinct) == 1 else "inconclusive: the comparisons disagree (" + "; ".join(
        f"against {arm}: {per_arm[arm]}" for arm in QUESTION) + ")"
    return {"differences": diffs, "verdicts": per_arm, "verdict": verdict,
            "gates": [g for g in (chosen, *own.values()) if g]}


def routing_table(shares: list[dict[str, dict[str, list[float]]]], slots: list[str]) -> list[str]:
    """Per layer, each modality's share of routed token slots per expert (mean over seeds), as markdown rows."""
    lines = []
    for layer in shares[0]:
        modalities = list(shares[0][layer])
        lines += [f"{layer}:", "", "| tokens | " + " | ".join(f"expert {e} ({s})" for e, s in enumerate(slots)) + " |",
                  "|---" * (len(slots) + 1) + "|"]
        for m in modalities:
            mean = [sum(s[layer][m][e] for s in shares) / len(shares) for e in range(len(slots))]
            lines.append(f"| {m} | " + " | ".join(f"{100 * v:.0f}%" for v in mean) + " |")
        lines.append("")
    return lines


def combine(per_seed: dict[int, dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """Mean and range over seeds of every arm's per-domain accuracy, the paired differences and the verdict, the
    routing in numbers, the pooling comparison."""
    summaries = [per_seed[s] for s in sorted(per_seed)]
    rows = [*ARMS, *BASE_RUNS]
    per = {row: {d: seed_stat([s["accuracy"][row][d] for s in summaries]) for d in summaries[0]["accuracy"][row]}
           for row in rows}
    means = {row: [s["mean"][row] for s in summaries] for row in rows}
    decided = verdicts(means, summaries[0].get("chance", 0.0), summaries[0]["plan"].get("discriminating") is not False)
    diffs = decided["differences"]
    shares = {m: [s["own_expert_share"][m] for s in summaries if s["own_expert_share"][m] is not None]
              for m in ("image", "audio", "video")}
    # keys apart from a seed summary's ("mean", "own_expert_share"): one seed's results.json holds both
    # the learning curves: val exact match (mean over domains) against training samples, mean and interval
    curves = {arm: curve_stat([s["runs"][arm]["details"].get("val_curves", {}).get("val/exact_match", [])
                               for s in summaries], summaries[0]["plan"]["batch_size"]) for arm in ARMS}
    result = {"learning_curves": {arm: c for arm, c in curves.items() if c},
              "per_domain": per, "mean_over_seeds": {row: seed_stat(v) for row, v in means.items()},
              **decided, "own_expert_share_over_seeds": shares, "margin": MARGIN}
    lines = ["| run | " + " | ".join(DOMAINS) + " | mean |", "|---" * (len(DOMAINS) + 2) + "|"]
    for row in rows:
        cells = [spread(per[row].get(d), 100, 1) or "-" for d in DOMAINS]
        lines.append(f"| {LABELS[row]} | " + " | ".join(cells) + f" | {spread(result['mean_over_seeds'][row], 100, 1)} |")
    plan = summaries[0]["plan"]
    # the pooling rows' seed: the first selection seed (a single `selection_seed` in results written before)
    pooling_seed = (plan.get("selection_seeds") or [plan.get("selection_seed", 0)])[0]
    slots = ["dense", "image", "audio", "video"]
    routing = {arm: [s["modality_routing"][arm] for s in summaries if s["modality_routing"].get(arm)]
               for arm in ("unimoe", "copies")}
    share_text = ", ".join(f"{m} {spread(seed_stat(v), 100, 1)}%" for m, v in shares.items() if v)
    text = "\n".join([
        "## Uni-MoE: do modality-specific experts help?", "",
        f"Test exact match (%) per domain ({plan['eval_samples']} samples each), mean (min-max) over "
        f"{len(summaries)} seed(s); stage 1: {plan['align_steps']} steps of batch {plan['batch_size']} (per "
        f"seed); stage 2: {plan['expert_steps']} steps per modality; each stage-3 arm: "
        f"{plan['steps']} steps of batch {plan['batch_size']}.", "",
        *lines, "",
        *[f"- {BASELINES[arm]}? Uni-MoE minus {arm} (mean accuracy) {interval_words(diffs[arm], 100, ' points')}; "
          f"margin {100 * MARGIN:+.1f} points: **{result['verdicts'][arm]}**." for arm in diffs],
        f"- Gates: {'; '.join(result['gates']) or 'all passed'}.", "",
        f"Verdict on \"modality-specific experts help\": **{result['verdict']}** (the protocol's rule).", "",
        "### Routing by modality (test split)", "",
        f"Share of each modality's routed token slots (all MoE layers) that Uni-MoE sends to that modality's expert "
        f"(1 of 4 experts, top-2: routing blind to modality gives 25%): {share_text or 'none recorded'}.", "",
        *(["Uni-MoE, share of each kind of token's routed slots per expert, mean over seeds "
           "(rows sum to 100%; `text`: the prompt and answer tokens):", "", *routing_table(routing["unimoe"], slots)]
          if routing["unimoe"] else []),
        *(["The same for the copies arm (its experts start identical, so any split is learnt by the router):", "",
           *routing_table(routing["copies"], [f"copy {e}" for e in range(4)])] if routing["copies"] else []),
        "### Video pooling", "",
        f"`motion` (needs frame order) after stage 1 with concat {spread(per['align_concat'].get('motion'), 100, 1)} "
        f"(over the seeds), with mean {spread(per['align_mean'].get('motion'), 100, 1)} (chance 50; one run, the "
        f"first selection seed's, {pooling_seed}); `frames` with concat "
        f"{spread(per['align_concat'].get('frames'), 100, 1)}, with mean "
        f"{spread(per['align_mean'].get('frames'), 100, 1)} (chance 25).", "",
    ])
    return result, text


def build_parser() -> argparse.ArgumentParser:
    return experiment_parser(__doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(build_parser(), argv)
    plan = QUICK if args.quick else Plan()
    resolve_data_path(DATA_ROOT)  # fail early, with the data layer's message, if the data is missing
    out = args.out.resolve()
    command = command_line("lightning_moe.experiments.unimoe", argv)
    declared = protocol(args.seeds, plan)
    selection = select_difficulty(plan, out, args.jobs, args.threads)
    plan, stage1 = selection["plan"], selection["stage1"]
    declared.settings = {"difficulty": difficulty_words(plan.difficulty),
                         "met": selection["met"] or f"NO rung met the rule ({NO_DISCRIMINATING_SETTING}): the last one "
                         "is used", "ladder": selection["tried"]}
    return run_seeds(out, args.seeds, functools.partial(_one_seed, plan, out / "base", stage1), command,
                     declared, combine, jobs=args.jobs, threads=args.threads)


def _one_seed(plan: Plan, bases: Path, pooling: dict[str, RunResult], workdir: Path,
              seed: int) -> tuple[dict[str, Any], str]:
    return run(workdir, replace(plan, seed=seed), bases, pooling)


if __name__ == "__main__":
    main()

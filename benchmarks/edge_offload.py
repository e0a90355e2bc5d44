"""EdgeMoE: expert offloading measured against keeping everything in memory and against on-demand loading.

    python benchmarks/edge_offload.py [--quick] [--checkpoint PATH] [--out DIR]

Prints two markdown tables (with the date and the machine):

1. Speed and memory, on a text-only sparse Llama built here with random weights: every decoder
   layer's MLP is a 16-expert top-2 SparseMoE, sized so that experts hold >= 85% of the parameters.
   Its routing profile comes from its own forward over calibration text (random prompts continued
   by the model itself, greedily: the kind of text it decodes at run time, other prompts than the
   measured ones); its bitwidth plan from token agreement with its float32 self on that text.
   Configurations, all decoding the same random prompts greedily at batch size 1, each in a process
   of its own (forked from a server that imported the modules once), the models loaded from the
   exported stores:
     - in memory: the model as trained, nothing offloaded;
     - on demand: experts read from the store whenever routed, no cache;
     - LRU cache: a cache of 25% of the float32 expert bytes, LRU eviction;
     - EdgeMoE: the same byte budget and LRU eviction, next-layer prediction from the profile's
       transition table with background prefetch, experts stored at the planned bitwidths and
       dequantised on load (the cache holds dense experts, so a hit costs nothing extra);
     - EdgeMoE, frequency/distance eviction: the same with the paper's eviction policy (profiled
       frequency / (1 + layer distance)); on this model's decoding, which revisits the experts it
       just used, recency predicts reuse better, so the EdgeMoE row uses LRU;
     - EdgeMoE, packed cache: as EdgeMoE, but the cache holds the experts packed (more of them fit
       the budget) and each use dequantises them (predicted ones ahead, on the prefetch thread);
     - EdgeMoE, lookahead prediction: as EdgeMoE, but the guesses come from the next layer's
       router applied to this layer's input (mixtral-offloading's speculative loading) instead
       of the transition table.
   Every offloaded configuration holds at most --working-experts experts dense at once (a
   prefill that routes to many experts brings them in groups).
   Memory: the process's peak resident set (VmHWM), whole and above the runtime (the resident set
   before loading anything: Python, torch, transformers, this package; the same for every row);
   the goal is judged on the part above the runtime. "Weights held" = resident parameters and
   buffers + the peak bytes of expert weights held at once (cache, loads in flight, reusable
   buffers, the working stack). "Guesses right": predicted experts the layer then chose, of all
   predicted (cached or not; prefetch loads only the guesses not cached).
   Reads: with --page-cache drop (the default) the store is evicted from the OS page cache before
   each configuration and every expert file after each read, so every load is a read from the
   disk, as on a device whose memory cannot hold the store (otherwise the page cache would hold
   the whole store: memory no budget counts, and a "load" would be a memory copy).
   Decode speed: per process the median over the prompts after a warm-up prompt; the table gives
   the median over --rounds rounds (the configurations interleaved); counters are the last round's
   and cover all its prompts, the warm-up and the prefills included.

2. Quality, on a sparse model trained on the shipped data: by default the quickstart config
   (configs/quickstart.yaml) trained for its own steps (or --steps) through the CLI (the same classes as
   `python main.py fit`), or a trained model given with --checkpoint (a .ckpt or save_pretrained
   directory). Exact-match accuracy on the shipped test split with experts offloaded at float32,
   int8, int4, int2 and the bitwidths planned on the validation split within --tolerance points.
   With --quality-set, a text set instead (`lightning_moe.retention`: one-word questions through the
   model's own tokenizer and chat template), on a real LLM: --model NAME (a dense LLM, e.g.
   smollm2-135m-instruct, upcycled as configs/real/stage3_moe.yaml does, before any training: its
   experts are copies of the dense MLPs) or --checkpoint (e.g. a configs/real/ stage 3 output). Each
   store is scored against the float32 one: greedy answers identical to float32's, answers correct,
   and the reference answers' negative log-likelihood per token (and its perplexity) given the prompt.
   The bitwidths are planned on --calibration-set, other questions of the same kinds written as one
   chat (`retention.conversation_ids`): teacher-forced next-token agreement with the float32 model
   within --tolerance points; a calibration question that is also in the scored set is refused.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import multiprocessing
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
from lightning_moe.provenance import git_state, provenance_words  # noqa: E402
from lightning_moe.inference import (  # noqa: E402
    ExpertStore, GenerationConfig, PlanConfig, RoutingProfile, apply_bits, exact_match_quality, export_store, generate,
    load_offloaded, load_resident_model, memory_status, plan_bitwidths, profile_routing, resident_bytes,
    token_agreement_quality,
)
from lightning_moe.inference.plan import reference_tokens  # noqa: E402
from lightning_moe.inference.store import expert_layers  # noqa: E402
from lightning_moe.models import MoEConfig, build_multimodal, upcycle  # noqa: E402
from lightning_moe.formats import load_backbone  # noqa: E402
from lightning_moe.retention import (CALIBRATION_SET, conversation_ids, evaluate_retention,  # noqa: E402
                                     read_retention_set)
from lightning_moe.tokens import load_tokenizer  # noqa: E402

TOKENIZER = str(ROOT / "data" / "tokenizer")
MiB = 2**20
# what this file imports: the forkserver imports it once (with torch and transformers) for every configuration
PRELOAD = ["lightning_moe.inference", "lightning_moe.models", "lightning_moe.tokens"]


# ---------------------------------------------------------------------------- speed and memory
def speed_model(tokenizer, hidden: int, inter: int, layers: int, experts: int, seed: int = 0):
    """Random sparse Llama: every MLP a `experts`-expert top-2 SparseMoE with independent random experts."""
    torch.manual_seed(seed)
    overrides = dict(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                     num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True)
    model = build_multimodal(tokenizer, "tiny-llama", overrides, encoders={})
    upcycle(model, MoEConfig(num_experts=experts, top_k=2, layers="all"))
    for _, moe in expert_layers(model):
        moe.reset_parameters()  # upcycled experts are copies: make them differ
        torch.nn.init.normal_(moe.router.proj.weight, std=hidden**-0.5)
    return model.eval()


def random_sequences(n: int, length: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(11, 61, (1, length), generator=g) for _ in range(n)]  # ids <= 10 are special


def decode_run(model, prompts: list[torch.Tensor], new_tokens: int) -> list[float]:
    """Decode tokens/second of each prompt (greedy, fixed length: no eos)."""
    config = GenerationConfig(max_new_tokens=new_tokens, eos_token_id=None)
    return [generate(model, p, torch.ones_like(p), config).decode_tokens_per_second for p in prompts]


def map_server_pages() -> None:
    """Map into this process the file pages that its parent, the forkserver, holds resident.

    A fork copies the page table entries of anonymous memory but not those of file mappings (the shared
    libraries' code and data that the imports read: ~100 MiB here), which the child would map again as it
    runs, counted above the runtime. Touching the pages the server holds (present bits of its
    /proc/PID/pagemap, without privileges; from the page cache, no disk read) makes the child's resident
    set that of the server, a fresh interpreter after the imports, as if the child had imported itself.
    """
    page, server = os.sysconf("SC_PAGE_SIZE"), os.getppid()
    with open(f"/proc/{server}/maps") as maps, open(f"/proc/{server}/pagemap", "rb", buffering=0) as pagemap:
        for line in maps:  # address perms offset dev inode path
            fields = line.split()
            if len(fields) < 6 or fields[1][0] != "r" or not fields[5].startswith("/") or fields[5].startswith("/dev/"):
                continue
            start, end = (int(a, 16) for a in fields[0].split("-"))
            for chunk in range(start, end, 4096 * page):  # 32 KiB of pagemap at a time: no peak of its own
                pagemap.seek(chunk // page * 8)
                entries = memoryview(pagemap.read(min(4096, (end - chunk) // page) * 8)).cast("Q")
                for i, entry in enumerate(entries):
                    if entry >> 63:  # present
                        ctypes.string_at(chunk + i * page, 1)


def measure_configuration(spec: dict) -> dict:
    """One configuration in this (new) process: load, decode the warm-up and measured prompts.

    Runs in a process of its own forked from the forkserver (`run_child`), so the process's peak
    resident set is this configuration's alone; `runtime_rss` is the resident set before loading
    anything (Python, torch, transformers and this package imported: the server's, `server_rss`),
    the same for every configuration.
    """
    map_server_pages()
    runtime = memory_status()["rss"]
    prompts = torch.load(spec["prompts"])
    if spec["offload"] is None:
        model, offloader = load_resident_model(ExpertStore(spec["store"])), None
    else:
        kwargs = dict(spec["offload"])
        if kwargs.pop("profile", None):
            kwargs["profile"] = RoutingProfile.load(spec["profile"])
        store = ExpertStore(spec["store"], drop_page_cache=spec["drop_page_cache"])
        model, offloader = load_offloaded(store, **kwargs)
    decode_run(model, prompts[:1], spec["new_tokens"])  # warm-up (cold cache, first checksums)
    speeds = decode_run(model, prompts[1:], spec["new_tokens"])
    if offloader is not None:
        offloader.close()
    memory = memory_status()
    stats = offloader.stats if offloader else None
    return {
        "decode_tokens_per_second": statistics.median(speeds), "speeds": speeds,
        "peak_rss": memory["peak_rss"], "runtime_rss": runtime,
        "weight_bytes": resident_bytes(model) + (stats.peak_expert_bytes if stats else 0),
        "hit_rate": stats.hit_rate if stats else None, "bytes_read": stats.bytes_read if stats else 0,
        "wait_seconds": stats.wait_seconds if stats else 0.0, "stats": stats.as_dict() if stats else None,
        "pid": os.getpid(), "torch_threads": torch.get_num_threads(), "server_rss": memory_status(os.getppid())["rss"],
    }


def forkserver() -> multiprocessing.context.BaseContext:
    """Processes forked from a server that has imported this file's modules (PRELOAD) and run nothing else.

    Each configuration gets a process of its own that starts at the runtime, without paying the ~5 s
    of imports a fresh interpreter would. The server is a fresh interpreter too: it has run no torch op,
    so no OpenMP thread pool is forked, and the children get the threads a fresh interpreter would
    (OMP_NUM_THREADS is inherited). Older Pythons (3.11 here) start the server without the parent's
    sys.path (cpython gh-117378) and cannot preload `__main__` (gh-126631): PYTHONPATH puts this checkout
    first there as sys.path does here, and each child re-runs this file's top level, its imports done.
    """
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def run_child(spec: dict, context: multiprocessing.context.BaseContext) -> dict:
    """`measure_configuration` in a process of its own; the store starts out of the OS page cache."""
    if spec["drop_page_cache"]:
        ExpertStore(spec["store"]).evict_page_cache()
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as process:  # one process, one configuration
        try:
            return process.submit(measure_configuration, spec).result()
        except Exception as error:
            raise RuntimeError(f"configuration {spec['name']!r} failed") from error


def speed_table(args, tokenizer, workdir: Path) -> tuple[str, dict]:
    model = speed_model(tokenizer, args.hidden, args.inter, args.layers, args.experts)
    total = sum(p.numel() for p in model.parameters())
    expert_params = sum(m.w_in.numel() + m.down_proj.numel() for _, m in expert_layers(model))
    # calibration text: random prompts continued by the model itself, the text it decodes at run time
    continued = []
    for prompt in random_sequences(args.calibration, 16, seed=1):
        out = generate(model, prompt, torch.ones_like(prompt), GenerationConfig(max_new_tokens=32, eos_token_id=None))
        continued.append(torch.cat([prompt, out.tokens], dim=1))
    calibration = [{"input_ids": s, "attention_mask": torch.ones_like(s)} for s in continued]
    prompts = random_sequences(args.prompts + 1, 16, seed=2)  # the first is the warm-up
    print(f"speed model: {args.layers} MoE layers x {args.experts} experts (hidden {args.hidden}, inter "
          f"{args.inter}); experts hold {100 * expert_params / total:.1f}% of {total / 1e6:.1f}M parameters",
          flush=True)

    start = time.perf_counter()
    profile = profile_routing(model, calibration)
    reference = reference_tokens(model, calibration)
    planning = calibration[: args.plan_sequences]  # each of the ~80 plan evaluations runs over these
    plan = plan_bitwidths(model, lambda m: token_agreement_quality(m, planning, reference[: len(planning)]),
                          PlanConfig(tolerance=args.speed_tolerance))
    counts = {b: sum(v == b for v in plan.bits.values()) for b in (8, 4, 2)}
    print(f"profiled {profile.tokens} tokens and planned bitwidths in {time.perf_counter() - start:.1f}s: "
          f"experts per bitwidth {counts}, token agreement {plan.quality:.1f}% (tolerance {args.speed_tolerance})",
          flush=True)

    float_store = export_store(model, workdir / "speed_f32")
    planned_store = export_store(model, workdir / "speed_planned", bits=plan.bits)
    profile.save(workdir / "speed_profile.json")
    torch.save(prompts, workdir / "speed_prompts.pt")
    budget = int(args.budget * float_store.expert_memory_bytes)
    del model, reference  # the configurations load the model from the stores, each in its own process

    working = {"max_working_experts": args.working_experts}  # the same bound on dense weights for every offload
    edge = dict(budget_bytes=budget, profile=True, prefetch=True, prefetch_width=args.prefetch_width,
                prefetch_min_probability=args.prefetch_min_probability, **working)
    f32, planned = str(float_store.directory), str(planned_store.directory)
    configurations = {
        "in memory": (f32, None),
        "on demand (no cache)": (f32, working),
        "LRU cache": (f32, {"budget_bytes": budget, **working}),
        "EdgeMoE": (planned, {"dequantize_on_load": True, "policy": "lru", **edge}),
        "EdgeMoE, frequency/distance eviction": (planned, {"dequantize_on_load": True, "policy": "freq_distance",
                                                           **edge}),
        "EdgeMoE, packed cache": (planned, {"policy": "lru", **edge}),
        "EdgeMoE, lookahead prediction": (planned, {"dequantize_on_load": True, "policy": "lru", **edge,
                                                    "profile": False, "prediction": "lookahead"}),
    }
    runs: dict[str, list[dict]] = {name: [] for name in configurations}
    context = forkserver()
    for round_index in range(args.rounds):  # rounds interleave the configurations: load drifts hit all alike
        for name, (store, offload_kwargs) in configurations.items():
            spec = {"name": name, "store": store, "offload": offload_kwargs, "profile": str(workdir / "speed_profile.json"),
                    "prompts": str(workdir / "speed_prompts.pt"), "new_tokens": args.new_tokens,
                    "drop_page_cache": args.page_cache == "drop"}
            runs[name].append(run_child(spec, context))
            print(f"  round {round_index + 1}/{args.rounds} {name}: {runs[name][-1]['decode_tokens_per_second']:.1f} "
                  f"tok/s, peak RSS {runs[name][-1]['peak_rss'] / MiB:.0f} MiB", flush=True)
    results = {}
    for name, measured in runs.items():
        results[name] = {**measured[-1],  # counters of the last round; speed: median over the rounds
                         "decode_tokens_per_second": statistics.median(r["decode_tokens_per_second"] for r in measured),
                         "rounds_tokens_per_second": [r["decode_tokens_per_second"] for r in measured],
                         "peak_rss": max(r["peak_rss"] for r in measured),
                         "model_rss": max(r["peak_rss"] - r["runtime_rss"] for r in measured)}

    base = results["in memory"]
    demand = results["on demand (no cache)"]["decode_tokens_per_second"]
    header = ("| configuration | peak RSS (MiB) | above runtime (MiB) | vs in memory | weights held (MiB) | decode tok/s "
              "| vs on demand | hit rate | guesses right | read (MiB) | waiting on loads (s) |")
    rows = [header, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        hit = "" if r["hit_rate"] is None else f"{100 * r['hit_rate']:.1f}%"
        stats = r["stats"] or {}
        guessed = f"{stats['guesses_right']}/{stats['guesses']}" if stats.get("guesses") else ""
        rows.append(f"| {name} | {r['peak_rss'] / MiB:.0f} | {r['model_rss'] / MiB:.0f} | "
                    f"{100 * r['model_rss'] / base['model_rss']:.1f}% | {r['weight_bytes'] / MiB:.1f} | "
                    f"{r['decode_tokens_per_second']:.1f} | {r['decode_tokens_per_second'] / demand:.2f}x | {hit} | {guessed} | "
                    f"{r['bytes_read'] / MiB:.1f} | {r['wait_seconds']:.2f} |")
    edge_result = results["EdgeMoE"]
    goals = {
        "peak memory <= 40% of in memory": edge_result["model_rss"] <= 0.4 * base["model_rss"],
        ">= 2x the decode speed of on demand": edge_result["decode_tokens_per_second"] >= 2 * demand,
    }
    reads = ("every expert read from storage (page cache dropped after each read)" if args.page_cache == "drop"
             else "expert files left in the OS page cache")
    title = (f"Speed and memory: {args.layers} MoE layers x {args.experts} experts (top-2), experts "
             f"{100 * expert_params / total:.1f}% of the parameters, cache budget {100 * args.budget:.0f}% of the "
             f"float32 expert bytes ({budget / MiB:.1f} MiB), {reads}; {args.prompts} prompts x {args.new_tokens} new "
             f"tokens, batch 1, each configuration in its own process, median of {args.rounds} round(s); EdgeMoE "
             f"bitwidths {counts}, prefetch width {args.prefetch_width}, guesses below {args.prefetch_min_probability} "
             f"skipped")
    return "\n".join([title, "", *rows]), {"results": results, "goals": goals, "plan_counts": counts,
                                          "budget_bytes": budget}


# ---------------------------------------------------------------------------- quality
UPCYCLING_CONFIG = ROOT / "configs/real/stage3_moe.yaml"  # MoE-LLaVA stage 3's surgery on a real LLM


def upcycled_model(name: str):
    """The dense LLM `name` upcycled with the `moe` settings of configs/real/stage3_moe.yaml (no training)."""
    import yaml

    moe = yaml.safe_load(UPCYCLING_CONFIG.read_text())["model"]["init_args"]["moe"]
    model = load_backbone(name)
    upcycle(model, MoEConfig(**moe))
    return model.eval(), f"{name} upcycled as {UPCYCLING_CONFIG.relative_to(ROOT)} ({moe}), untrained"


def trained_model(args, workdir: Path):
    if args.model:
        return upcycled_model(args.model)
    if args.checkpoint:
        return load_backbone(args.checkpoint).eval(), f"checkpoint {args.checkpoint}"
    from lightning_moe.cli import effective_config
    from lightning_moe.cli import main as cli_main

    # the config's own steps as the CLI composes it (it includes configs/_base/)
    steps = args.steps or effective_config(ROOT / "configs/quickstart.yaml")["trainer"]["max_steps"]
    cli = cli_main([
        "fit", "--config", str(ROOT / "configs/quickstart.yaml"), f"--trainer.max_steps={steps}",
        f"--trainer.val_check_interval={steps}", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={workdir / 'runs'}", f"--data.init_args.root={ROOT / 'data/shapes'}",
        f"--model.init_args.tokenizer={TOKENIZER}", f"--data.init_args.tokenizer={TOKENIZER}",
        *(["--data.init_args.batch_size=8", "--data.init_args.eval_batch_size=16",
           "--data.init_args.max_eval_samples_per_domain=16", "--data.init_args.max_train_samples_per_domain=64"]
          if args.quick else []),
    ])
    return cli.model.model.eval(), f"configs/quickstart.yaml trained {steps} steps"


class ShapesQuality:
    """Exact match of greedy answers on the shipped test split; bitwidths planned on the val split."""

    def __init__(self, args, tokenizer) -> None:
        from lightning_moe.edge import eval_batches  # reads datasets (Lightning): not imported by the speed children

        self.tokenizer = tokenizer
        self.test = eval_batches(str(ROOT / "data/shapes"), TOKENIZER, "test", args.max_eval_samples)
        self.val = eval_batches(str(ROOT / "data/shapes"), TOKENIZER, "val", args.max_eval_samples)
        self.samples = sum(len(b["answers"]) for b in self.test)
        self.header = ["test exact match (%)", "change (points)"]

    def plan_quality(self, model) -> float:
        return exact_match_quality(model, self.val, self.tokenizer)

    def score(self, model) -> dict:
        return {"exact_match": exact_match_quality(model, self.test, self.tokenizer)}

    def cells(self, result: dict, float32: dict) -> list[str]:
        return [f"{result['exact_match']:.2f}", f"{result['exact_match'] - float32['exact_match']:+.2f}"]

    def goals(self, results: dict) -> dict[str, bool]:
        return {"int8 within 1 point of float32": abs(results["int8"]["exact_match"] - results["float32"]["exact_match"])
                <= 1.0}

    def title(self, source: str, args, plan) -> str:
        return (f"Quality: {source}; exact match on {self.samples} test samples (all shipped domains); bitwidths "
                f"planned on the val split within {args.tolerance} point(s) (val: {plan.quality:.2f} vs "
                f"{plan.reference_quality:.2f})")


class TextSetQuality:
    """A retention text set scored against the float32 model; bitwidths planned on other text (module docstring)."""

    def __init__(self, args, model, model_name: str) -> None:
        self.tokenizer = load_tokenizer(model_name)
        self.quality_set, self.calibration_set = args.quality_set, args.calibration_set
        self.records = read_retention_set(args.quality_set)[: args.max_eval_samples]
        calibration = read_retention_set(args.calibration_set)
        scored = {r["question"].strip().lower() for r in self.records}
        overlap = [r["id"] for r in calibration if r["question"].strip().lower() in scored]
        if overlap:
            raise ValueError(f"{args.calibration_set}: {len(overlap)} calibration question(s) are in the scored set "
                             f"{args.quality_set} ({overlap[:3]}): the plan must not see the questions it is scored on")
        ids = torch.tensor([conversation_ids(self.tokenizer, calibration)])
        self.calibration = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
        self.calibration_questions = len(calibration)
        self.reference_tokens = reference_tokens(model, self.calibration)  # the model's own, float32 experts
        self.float32 = None  # the float32 store's scores (the first row), the reference of every row
        self.header = ["answers as float32", "answers correct", "answer NLL (nats/token)", "answer perplexity",
                       "change in NLL"]

    def plan_quality(self, model) -> float:
        return token_agreement_quality(model, self.calibration, self.reference_tokens)

    def score(self, model) -> dict:
        scores = evaluate_retention(model, self.tokenizer, self.records)
        if self.float32 is None:
            self.float32 = scores
        return {"retained": scores.retained(self.float32), "correct": sum(scores.correct),
                "questions": len(scores.ids), "answer_nll": scores.answer_nll,
                "answer_perplexity": scores.answer_perplexity, "answers": scores.answers}

    def cells(self, result: dict, float32: dict) -> list[str]:
        n = result["questions"]
        return [f"{result['retained']}/{n}", f"{result['correct']}/{n}", f"{result['answer_nll']:.4f}",
                f"{result['answer_perplexity']:.3f}", f"{result['answer_nll'] - float32['answer_nll']:+.4f}"]

    def goals(self, results: dict) -> dict[str, bool]:
        return {"int8 answers every question as float32 does": results["int8"]["retained"]
                == results["int8"]["questions"]}

    def title(self, source: str, args, plan) -> str:
        return (f"Quality: {source}; {len(self.records)} questions of {self.quality_set}, greedy (at most 4 new "
                f"tokens), each store against the float32 one; bitwidths planned on {self.calibration_set} "
                f"({self.calibration_questions} other questions as one chat of {self.calibration[0]['input_ids'].shape[1]} "
                f"tokens) within {args.tolerance} point(s) of next-token agreement with float32 (planned: "
                f"{plan.quality:.2f})")


def quality_table(args, tokenizer, workdir: Path) -> tuple[str, dict]:
    start = time.perf_counter()
    model, source = trained_model(args, workdir)
    print(f"trained model ({source}) ready in {time.perf_counter() - start:.0f}s", flush=True)
    task = (TextSetQuality(args, model, args.model or args.checkpoint) if args.quality_set
            else ShapesQuality(args, tokenizer))
    plan = plan_bitwidths(model, task.plan_quality, PlanConfig(tolerance=args.tolerance))
    counts = {b: sum(v == b for v in plan.bits.values()) for b in (8, 4, 2)}
    print(f"planned in {time.perf_counter() - start:.0f}s: {counts}, quality {plan.quality:.2f} vs float32 "
          f"{plan.reference_quality:.2f}", flush=True)
    results = {}
    for name, bits in [("float32", 32), ("int8", 8), ("int4", 4), ("int2", 2), ("planned", None)]:
        store = export_store(model, workdir / f"quality_{name}", bits=32 if bits is None else bits)
        if bits is None:
            apply_bits(store, plan.bits, plan.to_manifest())
        loaded, offloader = load_offloaded(ExpertStore(store.directory), budget_bytes=store.expert_memory_bytes)
        results[name] = {**task.score(loaded), "expert_bytes": store.expert_memory_bytes}
        offloader.close()
        print(f"  {name}: {task.cells(results[name], results['float32'])} ({time.perf_counter() - start:.0f}s)",
              flush=True)
    f32 = results["float32"]
    rows = ["| experts | expert bytes (KiB) | vs float32 | " + " | ".join(task.header) + " |",
            "|---|---|---|" + "---|" * len(task.header)]
    for name, r in results.items():
        label = f"planned {counts}" if name == "planned" else name
        rows.append(f"| {label} | {r['expert_bytes'] / 1024:.1f} | {100 * r['expert_bytes'] / f32['expert_bytes']:.1f}% | "
                    + " | ".join(task.cells(r, f32)) + " |")
    return "\n".join([task.title(source, args, plan), "", *rows]), {
        "results": results, "goals": task.goals(results), "plan": plan.to_manifest(), "source": source}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, a few steps")
    parser.add_argument("--checkpoint", default=None, help="trained sparse model for the quality table "
                                                           "(.ckpt or save_pretrained dir); default: train quickstart")
    parser.add_argument("--model", default=None,
                        help="quality table: a dense LLM (e.g. smollm2-135m-instruct) upcycled as configs/real/stage3_moe.yaml "
                             "does, untrained; needs --quality-set")
    parser.add_argument("--quality-set", default=None,
                        help="quality table: score on this retention text set (e.g. data/retention/smollm2_facts.jsonl) "
                             "instead of the shapes test split")
    parser.add_argument("--calibration-set", default=CALIBRATION_SET,
                        help="with --quality-set: the questions the bitwidth plan is calibrated on (none of the scored ones)")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps of the quickstart model (default: the config's own)")
    parser.add_argument("--tolerance", type=float, default=1.0, help="quality table: planning tolerance (points)")
    parser.add_argument("--max-eval-samples", type=int, default=None,
                        help="per domain, val and test (with --quality-set: the first N questions)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--inter", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--budget", type=float, default=0.25, help="cache budget, fraction of float32 expert bytes")
    parser.add_argument("--prefetch-width", type=int, default=1, help="experts prefetched per layer")
    parser.add_argument("--prefetch-min-probability", type=float, default=0.3,
                        help="prefetch only guesses at least this likely under the profile")
    parser.add_argument("--working-experts", type=int, default=1,
                        help="most experts an offloaded layer holds dense at once (prefill works in groups)")
    parser.add_argument("--speed-tolerance", type=float, default=2.0,
                        help="speed model: planning tolerance in token-agreement points")
    parser.add_argument("--calibration", type=int, default=4, help="calibration sequences (16 prompt + 32 generated tokens)")
    parser.add_argument("--plan-sequences", type=int, default=2, help="calibration sequences the speed plan uses")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--page-cache", choices=("drop", "keep"), default="drop",
                        help="drop: every expert read comes from storage (the store is evicted from the OS page cache "
                             "before each configuration and each file after each read); keep: reads may hit the page "
                             "cache (memory the budget does not count)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over all speed configurations (median)")
    parser.add_argument("--only", choices=("speed", "quality"), default=None, help="run one table only")
    parser.add_argument("--out", default=None, help="also write results.json and results.md here")
    args = parser.parse_args()
    if args.model and (args.checkpoint or not args.quality_set):
        parser.error("--model takes a dense LLM to upcycle: not with --checkpoint, and only with --quality-set "
                     "(the shapes data are not in its vocabulary)")
    provenance = git_state()  # the commit the run starts from (and whether the tree is dirty)
    if args.quick:
        args.hidden, args.inter, args.layers, args.steps = 64, 128, 2, 2
        args.max_eval_samples = args.max_eval_samples or 4
        args.calibration, args.prompts, args.new_tokens, args.rounds = 2, 1, 4, 1
    torch.manual_seed(0)
    tokenizer = load_tokenizer(TOKENIZER)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.out or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        speed, speed_results = speed_table(args, tokenizer, workdir) if args.only != "quality" else ("", {"goals": {}})
        quality, quality_results = (quality_table(args, tokenizer, workdir) if args.only != "speed"
                                    else ("", {"goals": {}}))
    stamp = (f"{datetime.date.today()} on {platform.machine()} ({torch.get_num_threads()} torch threads), torch "
             f"{torch.__version__}; total {time.perf_counter() - start:.0f}s; {provenance_words(provenance)}")
    goals = {**speed_results["goals"], **quality_results["goals"]}
    command = shlex.join(["python", "benchmarks/edge_offload.py", *sys.argv[1:]])
    text = "\n\n".join([f"`{command}` ({stamp})", speed, quality,
                        "Goals: " + "; ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in goals.items())])
    print("\n" + text)
    if args.out:
        Path(args.out, "results.md").write_text(text + "\n")
        Path(args.out, "results.json").write_text(json.dumps(
            {"speed": speed_results, "quality": quality_results, "command": command, "stamp": stamp, **provenance}, indent=1, default=str))


if __name__ == "__main__":
    main()

"""EdgeMoE commands, `python -m lightning_moe.edge`: export, profile, plan, generate, verify.

    export    a trained model (save_pretrained directory or Lightning .ckpt) -> an expert store
    profile   routing statistics on a calibration split -> STORE/routing_profile.json
    plan      expert-wise bitwidths within a quality tolerance -> experts rewritten, plan in the manifest
    generate  answer a prompt (and images, audio, video, any registered modality's items) with experts offloaded,
              print the answer and the counters
    verify    check the manifest against its checksums and every file of a store against the manifest (sizes,
              sha256, paths inside the store); list every problem, one line each

This is the command layer over `lightning_moe.inference`: it reads datasets and media files (through
`lightning_moe.data`, hence Lightning), which `inference/` itself never imports (docs/architecture.md:
inference imports models/ and layers/ only); the library takes plain batches. A damaged store
(`StoreError`) ends any command with exit status 1 and no traceback: one line naming the damaged files (how many,
and the first few), or, for `verify`, every damaged file, one a line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from .data import (BadRecordError, ConversationTokenizer, DomainMixtureDataModule, MediaDecodeError, load_media,
                   parse_record, prompt_record)
from .data.records import ParsedRecord
from .inference import (PROFILE_NAME, ExpertStore, GenerationConfig, PlanConfig, RoutingProfile, StoreError, apply_bits,
                        cache_budget, exact_match_quality, export_store, generate, load_offloaded, load_resident_model,
                        plan_bitwidths, profile_routing, resident_bytes)
from .formats import load_backbone
from .modalities import build_transforms, modalities, modality_names, split_option
from .models.multimodal import MultimodalLM
from .tokens import DEFAULT_TOKENIZER, load_tokenizer

# the shipped modalities' transform flags, `--<modality>-<option>`: options of that modality's transform
TRANSFORM_FLAGS = ("image_size", "audio_chunk_seconds", "audio_max_chunks", "video_num_frames")


def eval_batches(root: str, tokenizer: str, split: str, max_samples_per_domain: int | None,
                 batch_size: int = 100) -> list[dict[str, Any]]:
    """Collated batches of every domain's `split` ('val' or 'test') under a shipped-layout data root."""
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    data = DomainMixtureDataModule(root=root, tokenizer=tokenizer, eval_batch_size=batch_size,
                                   max_eval_samples_per_domain=max_samples_per_domain)
    data.setup("validate" if split == "val" else "test")
    loaders = data.val_dataloader() if split == "val" else data.test_dataloader()
    return [batch for loader in loaders for batch in loader]


def cmd_export(args: argparse.Namespace) -> None:
    model = load_backbone(args.model).eval()
    store = export_store(model, args.out, bits=args.bits)
    print(f"exported {len(store.entries)} experts of {len(store.layers)} MoE layers to {store.directory} "
          f"({store.expert_memory_bytes / 2**20:.2f} MiB of experts, {resident_bytes(model) / 2**20:.2f} MiB model)")


def cmd_profile(args: argparse.Namespace) -> None:
    store = ExpertStore(args.store)
    model = load_resident_model(store)
    batches = eval_batches(args.data, args.tokenizer, args.split, args.max_samples, args.batch_size)
    profile = profile_routing(model, batches)
    out = Path(args.out) if args.out else store.directory / PROFILE_NAME
    profile.save(out)
    print(f"profiled {profile.tokens} tokens over {len(store.layers)} MoE layers -> {out}")


def cmd_plan(args: argparse.Namespace) -> None:
    store = ExpertStore(args.store)
    model = load_resident_model(store)
    tokenizer = load_tokenizer(args.tokenizer)
    batches = eval_batches(args.data, args.tokenizer, args.split, args.max_samples, args.batch_size)
    config = PlanConfig(tolerance=args.tolerance, levels=tuple(args.levels))
    plan = plan_bitwidths(model, lambda m: exact_match_quality(m, batches, tokenizer, args.max_new_tokens), config,
                          progress=print)
    apply_bits(store, plan.bits, {**plan.to_manifest(), "metric": f"exact match (%) on {args.data} {args.split}"})
    counts = {b: sum(1 for v in plan.bits.values() if v == b) for b in sorted(set(plan.bits.values()))}
    print(f"plan: experts per bitwidth {counts}; quality {plan.quality:.2f} vs float32 {plan.reference_quality:.2f} "
          f"(tolerance {plan.tolerance}); expert bytes now {store.expert_memory_bytes / 2**20:.2f} MiB")


def prompt_media(args: argparse.Namespace) -> dict[str, list[str | list[str]]]:
    """--input MODALITY=PATH (and the shipped modalities' --image / --audio / --video) as a record's modality
    entries (absolute paths: a record's paths resolve under a root, here the file system's)."""
    def absolute(paths: list[str]) -> list[str]:
        return [str(Path(p).absolute()) for p in paths]

    media: dict[str, list[str | list[str]]] = {}
    for given in args.input or []:
        name, _, path = given.partition("=")
        if not path or name not in modality_names():
            raise SystemExit(f"--input {given!r}: write MODALITY=PATH, MODALITY one of {list(modality_names())}")
        media.setdefault(name, []).extend(absolute([path]))
    if args.image:
        media.setdefault("image", []).extend(absolute([args.image]))
    if args.audio:
        media.setdefault("audio", []).extend(absolute(args.audio))
    video = absolute(args.video or [])
    if video:  # one video: a directory (or a lone frame) stays a flat entry, several frame files are one frame list
        media.setdefault("video", []).extend([video] if len(video) > 1 else video)
    return media


def prompt_inputs(args: argparse.Namespace, model: MultimodalLM, store: ExpertStore, parsed: ParsedRecord,
                  chat: ConversationTokenizer) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The prompt's (1, P) ids and its modality tensors, as `collate_batch` makes them for the same record: the
    transforms are the data module's, sized from the stored towers (`ModalitySpec.transform_options`) unless a
    flag says otherwise."""
    missing = [m for m in parsed.files if m not in model.modalities]
    if missing:
        raise SystemExit(f"{store.directory}: the stored model has no {' or '.join(missing)} encoder (it reads "
                         f"{', '.join(model.modalities) or 'text only'}); drop the {' and '.join(missing)} inputs")
    options: dict[str, dict[str, Any]] = {}
    for spec in modalities():
        if spec.name in model.encoders and spec.transform_options is not None:
            options[spec.name] = spec.transform_options(model.encoders[spec.name])
    for flag in TRANSFORM_FLAGS:
        name, option = split_option(flag)
        if getattr(args, flag) is not None:
            options.setdefault(name, {})[option] = getattr(args, flag)
    try:
        media = load_media(parsed.files, build_transforms(options))
    except MediaDecodeError as err:
        raise SystemExit(f"generate: {err}") from err
    ids = chat.ids(parsed.messages[:1], add_generation_prompt=True)  # the data set's prompt_ids of this record
    return torch.tensor([ids]), {k: v for k, v in media.items() if v is not None}


def cmd_generate(args: argparse.Namespace) -> None:
    try:  # the files are checked as a data set's are (present, frames of a video) before the model loads
        parsed = parse_record(prompt_record(args.prompt, prompt_media(args)), Path(Path.cwd().anchor), "generate", None)
    except BadRecordError as err:
        raise SystemExit(str(err)) from err
    store = ExpertStore(args.store, drop_page_cache=args.drop_page_cache)
    profile_path = store.directory / PROFILE_NAME
    needs_profile = (args.prefetch and args.prediction == "table") or args.policy == "freq_distance"
    profile = RoutingProfile.load(profile_path) if needs_profile else None
    model, offloader = load_offloaded(
        store, budget_bytes=cache_budget(store.expert_memory_bytes, args.budget_fraction, args.budget_mb), policy=args.policy,
        profile=profile, prefetch=args.prefetch, prediction=args.prediction, prefetch_width=args.prefetch_width,
        dequantize_on_load=args.dequantize_on_load,
    )
    tokenizer = load_tokenizer(args.tokenizer)
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    generator = torch.Generator().manual_seed(args.seed)
    try:
        input_ids, inputs = prompt_inputs(args, model, store, parsed, ConversationTokenizer(tokenizer))
        out = generate(model, input_ids, torch.ones_like(input_ids), config, generator, **inputs)
    finally:
        offloader.close()  # stops the prefetch thread, also when generation fails
    print(tokenizer.decode(out.tokens[0], skip_special_tokens=True).strip())
    print(json.dumps({**offloader.stats.as_dict(), "decode_tokens_per_second": out.decode_tokens_per_second}),
          file=sys.stderr)


def cmd_verify(args: argparse.Namespace) -> None:
    checked = ExpertStore(args.store).verify_files()
    print(f"{args.store}: all {checked} files match the manifest (sizes and sha256)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lightning_moe.edge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="trained model -> expert store")
    p.add_argument("--model", required=True, help="save_pretrained directory, Lightning .ckpt or GGUF file of a sparse model")
    p.add_argument("--out", required=True, help="store directory to write")
    p.add_argument("--bits", type=int, default=32, choices=(32, 8, 4, 2), help="bitwidth of every expert (32 = float32)")
    p.set_defaults(func=cmd_export)

    def data_args(p: argparse.ArgumentParser, split: str) -> None:
        p.add_argument("--store", required=True)
        p.add_argument("--data", default="data/shapes", help="dataset root (one folder per domain)")
        p.add_argument("--split", default=split, choices=("val", "test"))
        p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER)
        p.add_argument("--max-samples", type=int, default=None, help="first N samples of each domain")
        p.add_argument("--batch-size", type=int, default=100)

    p = sub.add_parser("profile", help="routing statistics for prediction and eviction")
    data_args(p, "val")
    p.add_argument("--out", default=None, help=f"profile file (default STORE/{PROFILE_NAME})")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("plan", help="expert-wise bitwidths within a quality tolerance (rewrites the store)")
    data_args(p, "val")
    p.add_argument("--tolerance", type=float, default=1.0, help="largest exact-match drop (points) against float32")
    p.add_argument("--levels", type=int, nargs="+", default=[8, 4, 2], help="bitwidths, high to low")
    p.add_argument("--max-new-tokens", type=int, default=4)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("generate", help="answer a prompt with experts offloaded")
    p.add_argument("--store", required=True)
    p.add_argument("--prompt", required=True)
    # placeholders go before the prompt, one line each, in the modalities' registration order (image, audio,
    # video, ...): as the shipped records write them
    p.add_argument("--input", action="append", default=None, metavar="MODALITY=PATH",
                   help="an item of any registered modality (a file; a video: its frame directory), repeatable; "
                        "the prompt gets its placeholder")
    p.add_argument("--image", default=None, help="an image file; the prompt gets an <image> placeholder")
    p.add_argument("--image-size", type=int, default=None,
                   help="resize images and video frames to this (default: the stored tower's)")
    p.add_argument("--audio", nargs="+", default=None, metavar="FILE",
                   help="audio clips (WAV, FLAC, ...; mono 16 kHz after reading), an <audio> placeholder each")
    p.add_argument("--audio-chunk-seconds", type=float, default=None,
                   help="log-mel window in seconds (default: the stored audio tower's, "
                        "max_source_positions x 2 frames at 100 frames/s)")
    p.add_argument("--audio-max-chunks", type=int, default=1,
                   help="windows per clip, later ones dropped (default 1, as configs/unimoe)")
    p.add_argument("--video", nargs="+", default=None, metavar="PATH",
                   help="one video: a directory of frames or its frame files in order; the prompt gets a <video>")
    p.add_argument("--video-num-frames", type=int, default=4,
                   help="frames per video, fewer padded, more sampled uniformly (default 4, as configs/unimoe)")
    p.add_argument("--tokenizer", default=DEFAULT_TOKENIZER)
    p.add_argument("--budget-fraction", type=float, default=None, help="cache budget as a fraction of all expert bytes")
    p.add_argument("--budget-mb", type=float, default=None, help="cache budget in MiB (neither: no cache)")
    p.add_argument("--policy", default="lru", choices=("lru", "freq_distance"))
    p.add_argument("--prefetch", action="store_true", help=f"predict and prefetch experts (needs STORE/{PROFILE_NAME})")
    p.add_argument("--prediction", default="table", choices=("table", "lookahead"),
                   help="prefetch guesses: the profile's transition table (EdgeMoE) or the next layer's router on "
                        "this layer's input (lookahead)")
    p.add_argument("--prefetch-width", type=int, default=None, help="experts prefetched per layer (default top_k)")
    p.add_argument("--dequantize-on-load", action="store_true",
                   help="cache quantised experts dense (a hit costs nothing more; the budget holds fewer of them)")
    p.add_argument("--drop-page-cache", action="store_true",
                   help="every expert read from storage: drop each file from the OS page cache after reading it")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("verify", help="check every file of a store against its manifest (exit code 1 if any is damaged)")
    p.add_argument("--store", required=True)
    p.set_defaults(func=cmd_verify)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except StoreError as err:  # it names the damaged files and the manifest entry: a traceback would add nothing
        # verify lists every damaged file, one a line; the other commands say it in one line
        print(f"{args.command}: {err if args.command == 'verify' else err.one_line()}", file=sys.stderr)
        raise SystemExit(1) from err


if __name__ == "__main__":
    main()

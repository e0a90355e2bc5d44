"""Deterministic generator of the shipped audio, video and cross-modal domains (`data/media`), for Uni-MoE.

    python -m lightning_moe.data.synthetic_media --out data/media      # also writes data/media_tokenizer

regenerates `data/media` (and `data/media_tokenizer`: the shapes tokenizer of `synthetic.py` with the media
domains' words appended, so shapes token ids are the same in both) byte-identically
with the same libsndfile / Pillow / zlib builds: every random choice comes from `random.Random`
seeded with a string naming (seed, pool, split).

Audio: 1 s clips, 16 kHz mono, 16-bit FLAC (libsndfile through soundfile), pure tones with 5 ms
fades. Designed for log-mel features of a 1 s Whisper window (100 frames of 10 ms): every cue is
at least 50 ms (5 frames) long and pitches are an octave or more apart.

- beeps: "How many beeps are there?" -> one .. four. 0.1 s beeps (one pitch per clip, 800-1250
  Hz), one per quarter-second slot, starting 20-120 ms into it, so at least 50 ms apart.
- pitch: "Is the tone high or low?" -> high (2-4 kHz) | low (200-400 Hz); one 0.3-0.5 s tone.
  `MediaDifficulty.pitch_ratio` (5) is the ratio of the lowest high pitch to the highest low one.
- longer: "Which tone is longer?" -> first | second; two tones of one pitch, 0.08-0.15 s and
  0.3-0.45 s, at least 0.1 s apart.

Video: 4 frames of 32x32 RGB (PNG, the shapes' drawing on white).

- frames: "How many frames show a shape?" -> one .. four; the other frames are blank. Each video
  is a directory of frames (`videos/frames/<split>/<n>/0.png ..`).
- motion: "Which way does the shape move?" -> left | right; one shape crosses the frame in 6-pixel
  steps. Left and right videos hold the SAME frames in opposite orders, so a model that pools
  frames without their order (mean pooling) is at chance; keeping per-frame tokens can pass.
  Each video is a list of frame files from one shared pool (`videos/pool/*.png`).

Cross-modal (image + audio):

- beeps_shapes: "Does the number of beeps match the number of shapes?" -> yes | no (balanced; a
  `no` differs by at least one), an image with 1-4 shapes and a beeps clip.

Held out: every split draws its clips, images and frame-count videos from its own pool (made with
its own seed, train's first, then val's, then test's), and a pool item whose bytes (a clip's FLAC, an
image's PNG, a video's frames) equal an item of an earlier split is drawn again, so no val or test
item is a training item and no test item a val one. Motion's test and val videos use (shape, colour,
row) combinations that train never shows. A held-out score is not recall of a memorised item.
Answers are exactly balanced per split. `MediaDifficulty` sets the pitch distance and the noise
added to every clip; `generate_media(out_dir, difficulty, seed)` writes (once, cached by a hash of its
settings) the set at another difficulty. The generator also writes `README.md` with the statistics of
what it wrote.
"""

import argparse
import io
import itertools
import json
import random
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import soundfile

from lightning_moe.data.synthetic import (
    CELLS,
    COLOURS,
    GENERATOR_VERSION,
    NUMBERS,
    SHAPES,
    SPLITS,
    Shape,
    ShapesDifficulty,
    balanced,
    build_tokenizer,
    cached_set,
    digest,
    draw,
    draw_new,
    place,
)
from lightning_moe.data.records import human_turn

RATE = 16_000
CLIP_SECONDS = 1.0
FADE_SECONDS = 0.005  # raised-cosine ramps: no clicks (broadband energy) at tone edges
AMPLITUDE = 0.5
WHITE = (255, 255, 255)
N_FRAMES = 4
MOTION_STEP = 6  # pixels per frame: x offsets 0, 6, 12, 18 move the 12x12 shape from x=2 to x=20
MOTION_ROWS = (0, 6, 12, 18)  # y offsets of a moving shape (its row in the frame)

# distinct clips / images / videos per split: small pools, each reused by many records
POOL_SIZES = {"train": 192, "val": 32, "test": 32}
LOW_PITCH = (200.0, 400.0)  # Hz; high pitches span this times `MediaDifficulty.pitch_ratio`
SHAPES_DIFFICULTY = ShapesDifficulty()  # the images' and frames' shapes: as the shipped shapes set's


@dataclass(frozen=True)
class MediaDifficulty:
    """What the generated media set asks of a model; the shipped `data/media` is the defaults."""

    pitch_ratio: float = 5.0  # pitch: lowest high tone / highest low tone (high tones 400 r-800 r Hz): 1-9.5
    audio_noise: float = 0.0  # standard deviation of white noise added to every clip (tones peak at 0.5): 0-0.5

    def __post_init__(self):
        for name, (low, high) in {"pitch_ratio": (1.0, 9.5), "audio_noise": (0.0, 0.5)}.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ValueError(f"MediaDifficulty.{name} must be a number in [{low}, {high}], got {value!r}")


@dataclass(frozen=True)
class MediaDomain:
    modalities: tuple[str, ...]  # in placeholder order
    question: str
    answers: tuple[str, ...]
    convention: str


DOMAINS = {
    "beeps": MediaDomain(("audio",), "How many beeps are there?", tuple(NUMBERS.values()),
                         "number of 0.1 s beeps in a 1 s clip"),
    "pitch": MediaDomain(("audio",), "Is the tone high or low?", ("high", "low"), "high: {high} Hz, low: {low} Hz"),
    "longer": MediaDomain(("audio",), "Which tone is longer?", ("first", "second"),
                          "which of two tones lasts longer (about 0.1 s against 0.4 s)"),
    "frames": MediaDomain(("video",), "How many frames show a shape?", tuple(NUMBERS.values()),
                          "frames (of 4) holding a shape; the rest are blank"),
    "motion": MediaDomain(("video",), "Which way does the shape move?", ("left", "right"),
                          "direction of a shape across 4 frames (needs frame order)"),
    "beeps_shapes": MediaDomain(("image", "audio"), "Does the number of beeps match the number of shapes?",
                                ("yes", "no"), "beeps in the clip == shapes in the image"),
}


def vocabulary_texts() -> list[str]:
    """Every question and answer of these domains (the tiny tokenizer appends their new words)."""
    return [text for info in DOMAINS.values() for text in (info.question, *info.answers)]


# ----- audio ---------------------------------------------------------------------------------


def tone(freq: float, seconds: float) -> np.ndarray:
    """A sine of `seconds` with raised-cosine fades, float64 (samples,)."""
    n = round(seconds * RATE)
    wave = AMPLITUDE * np.sin(2 * np.pi * freq * np.arange(n) / RATE)
    ramp = round(FADE_SECONDS * RATE)
    fade = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp) / ramp)
    wave[:ramp] *= fade
    wave[n - ramp :] *= fade[::-1]
    return wave


def clip(tones: list[tuple[float, float, float]]) -> np.ndarray:
    """A CLIP_SECONDS clip holding tones given as (start s, frequency Hz, duration s)."""
    out = np.zeros(round(CLIP_SECONDS * RATE))
    for start, freq, seconds in tones:
        wave = tone(freq, seconds)
        begin = round(start * RATE)
        out[begin : begin + len(wave)] += wave
    return out


def flac(samples: np.ndarray, rng: random.Random, noise: float = 0.0) -> bytes:
    """FLAC bytes of the samples plus white noise of standard deviation `noise` (drawn from `rng`)."""
    if noise:
        samples = samples + np.random.default_rng(rng.getrandbits(64)).normal(0.0, noise, len(samples))
    buffer = io.BytesIO()
    soundfile.write(buffer, np.clip(samples, -1.0, 1.0), RATE, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def beeps_clip(rng: random.Random, count: int) -> list[tuple[float, float, float]]:
    """`count` 0.1 s beeps, one in each of `count` random quarter-second slots, 20-120 ms into it (>= 50 ms apart)."""
    freq = float(rng.randint(800, 1250))
    slots = sorted(rng.sample(range(4), count))
    return [(round(0.25 * s + rng.uniform(0.02, 0.12), 3), freq, 0.1) for s in slots]


def pitch_clip(rng: random.Random, answer: str, ratio: float = 5.0) -> list[tuple[float, float, float]]:
    low, high = LOW_PITCH
    freq = rng.uniform(high * ratio, 2 * high * ratio) if answer == "high" else rng.uniform(low, high)
    seconds = rng.uniform(0.3, 0.5)
    return [(rng.uniform(0.05, CLIP_SECONDS - seconds - 0.05), round(freq, 1), round(seconds, 3))]


def longer_clip(rng: random.Random, answer: str) -> list[tuple[float, float, float]]:
    freq = round(rng.uniform(500, 1500), 1)
    short, long = round(rng.uniform(0.08, 0.15), 3), round(rng.uniform(0.3, 0.45), 3)
    first, second = (long, short) if answer == "first" else (short, long)
    start = round(rng.uniform(0.03, 0.1), 3)
    gap = round(rng.uniform(0.1, 0.2), 3)
    return [(start, freq, first), (start + first + gap, freq, second)]


# ----- images and video frames -----------------------------------------------------------------


def shapes_image(rng: random.Random, count: int) -> bytes:
    """White 32x32 image with `count` shapes in distinct cells (the shapes data set's drawing)."""
    cells = rng.sample(sorted(CELLS), count)
    return draw([place(rng, SHAPES_DIFFICULTY, rng.choice(SHAPES), rng.choice(list(COLOURS)), cell) for cell in cells],
                WHITE)


def shape_frame(rng: random.Random) -> bytes:
    """A frame of a frame-count video: one shape in a random cell."""
    cell = rng.choice(sorted(CELLS))
    return draw([place(rng, SHAPES_DIFFICULTY, rng.choice(SHAPES), rng.choice(list(COLOURS)), cell)], WHITE)


def blank_frame() -> bytes:
    return draw([], WHITE)


def motion_frame(kind: str, colour: str, dy: int, step: int) -> bytes:
    """The shape at column step (0..3) of its path, row offset dy."""
    return draw([Shape(kind, colour, 0, 0, dx=MOTION_STEP * step, dy=dy)], WHITE)


def motion_combos(seed: int) -> dict[str, list[tuple[str, str, int]]]:
    """(shape, colour, row) combinations per split: val and test get their own, never seen in training."""
    combos = [(k, c, dy) for k in SHAPES for c in COLOURS for dy in MOTION_ROWS]
    random.Random(f"{seed}:motion:combos").shuffle(combos)
    held = len(combos) // 8
    return {"val": combos[:held], "test": combos[held : 2 * held], "train": combos[2 * held :]}


# ----- data set ------------------------------------------------------------------------------


class _Writer:
    """Writes each distinct file once under `out`, returning its path relative to `out`."""

    def __init__(self, out: Path):
        self.out = out

    def __call__(self, rel: str, data: bytes) -> str:
        path = self.out / rel
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return rel


def _cyclers(rng: random.Random, pools: dict) -> dict:
    """answer -> a function returning the answer's pool items in shuffled rounds, so every item is used."""
    def cycler(items: list[str]):
        order = items[:]
        rng.shuffle(order)
        position = iter(itertools.cycle(order))
        return lambda: next(position)

    return {answer: cycler(items) for answer, items in pools.items()}


def _record(domain: str, split: str, index: int, media: dict[str, str | list[str]], answer: str) -> dict:
    info = DOMAINS[domain]
    question = human_turn(info.question, {m: 1 for m in info.modalities})  # one placeholder line per item
    return {
        "id": f"{domain}-{split}-{index:05d}",
        **media,
        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
    }


def generate_split(out: Path, split: str, n: int, seed: int, pool: int,
                   difficulty: MediaDifficulty = MediaDifficulty(), earlier: set[str] | None = None,
                   ) -> dict[str, list[dict]]:
    """Write the pools of one split (`pool` distinct items of each kind) and return its records per domain.

    `earlier`: digests of the earlier splits' items (a clip's, an image's bytes; a video's frames' bytes
    joined); an item among them is drawn again, and this split's digests are added to it.
    """
    earlier = set() if earlier is None else earlier
    written: set[str] = set()
    write = _Writer(out)
    records: dict[str, list[dict]] = {}

    def rng(name: str) -> random.Random:
        return random.Random(f"{seed}:{name}:{split}")

    def new(what: str, draw_once) -> bytes | list[bytes]:
        """An item of this split's pool `what` that no earlier split holds (its bytes, or a video's frames)."""
        def as_bytes():
            item = draw_once()
            return (b"".join(item) if isinstance(item, list) else item), item

        data, item = draw_new(as_bytes, earlier, f"media {split} pool {what!r} at {difficulty}")
        written.add(digest(data))
        return item

    def clip_of(r: random.Random, tones) -> bytes:
        return flac(clip(tones), r, difficulty.audio_noise)

    # audio pools: a clip per (answer, variant), answers balanced within the pool
    beeps: dict[int, list[str]] = {k: [] for k in NUMBERS}
    r = rng("beeps")
    for i, count in enumerate(balanced(r, list(NUMBERS), pool)):
        beeps[count].append(write(f"audio/beeps/{split}/{i:03d}.flac",
                                  new("beeps", lambda: clip_of(r, beeps_clip(r, count)))))
    makers = {"pitch": lambda r, a: pitch_clip(r, a, difficulty.pitch_ratio), "longer": longer_clip}
    two_way = {}
    for domain, make in makers.items():
        r = rng(domain)
        two_way[domain] = {a: [] for a in DOMAINS[domain].answers}
        for i, answer in enumerate(balanced(r, list(DOMAINS[domain].answers), pool)):
            two_way[domain][answer].append(write(f"audio/{domain}/{split}/{i:03d}.flac",
                                                 new(domain, lambda: clip_of(r, make(r, answer)))))

    # video: frame-count videos as directories, motion videos as frame lists from one shared pool
    frame_videos: dict[int, list[str]] = {k: [] for k in NUMBERS}
    r = rng("frames")
    for i, count in enumerate(balanced(r, list(NUMBERS), pool)):
        def video() -> list[bytes]:
            shown = set(r.sample(range(N_FRAMES), count))
            return [shape_frame(r) if f in shown else blank_frame() for f in range(N_FRAMES)]

        directory = f"videos/frames/{split}/{i:03d}"
        for f, png in enumerate(new("frames", video)):
            write(f"{directory}/{f}.png", png)
        frame_videos[count].append(directory)

    images: dict[int, list[str]] = {k: [] for k in NUMBERS}
    r = rng("images")
    for i, count in enumerate(balanced(r, list(NUMBERS), pool)):
        images[count].append(write(f"images/{split}/{i:03d}.png", new("images", lambda: shapes_image(r, count))))
    earlier |= written

    # records: answers exactly balanced, items drawn from the split's pools
    r = rng("records")
    next_beeps = _cyclers(r, beeps)
    records["beeps"] = [_record("beeps", split, i, {"audio": next_beeps[count]()}, NUMBERS[count])
                        for i, count in enumerate(balanced(r, list(NUMBERS), n))]
    for domain in ("pitch", "longer"):
        next_clip = _cyclers(r, two_way[domain])
        records[domain] = [_record(domain, split, i, {"audio": next_clip[a]()}, a)
                           for i, a in enumerate(balanced(r, list(DOMAINS[domain].answers), n))]
    next_video = _cyclers(r, frame_videos)
    records["frames"] = [_record("frames", split, i, {"video": next_video[count]()}, NUMBERS[count])
                         for i, count in enumerate(balanced(r, list(NUMBERS), n))]
    combos = motion_combos(seed)[split]
    records["motion"] = []
    for i, answer in enumerate(balanced(r, ["left", "right"], n)):
        kind, colour, dy = r.choice(combos)
        steps = range(N_FRAMES) if answer == "right" else reversed(range(N_FRAMES))
        frames = [write(f"videos/pool/{kind}_{colour}_{dy:02d}_{s}.png", motion_frame(kind, colour, dy, s)) for s in steps]
        records["motion"].append(_record("motion", split, i, {"video": frames}, answer))
    records["beeps_shapes"] = []
    next_image, next_beeps = _cyclers(r, images), _cyclers(r, beeps)
    for i, answer in enumerate(balanced(r, ["yes", "no"], n)):
        shapes = r.choice(list(NUMBERS))
        count = shapes if answer == "yes" else r.choice([k for k in NUMBERS if k != shapes])
        media = {"image": next_image[shapes](), "audio": next_beeps[count]()}
        records["beeps_shapes"].append(_record("beeps_shapes", split, i, media, answer))
    return records


OWNED = ("audio", "videos", "images", *DOMAINS)  # what the generator writes, and so may remove


def generate(
    out: str | Path, n_train: int = 2000, n_eval: int = 200, seed: int = 0, pools: dict[str, int] | None = None,
    difficulty: MediaDifficulty = MediaDifficulty(),
) -> dict[str, dict[str, list[dict]]]:
    """Write the whole media data set (clips, frames, images, JSONL per domain and split, README).

    `pools`: distinct items per split (default `POOL_SIZES`; tests use small ones).
    """
    pools = pools or POOL_SIZES
    out = Path(out)
    for owned in OWNED:  # stale files of an earlier run cannot linger
        if (out / owned).is_dir():
            shutil.rmtree(out / owned)
    out.mkdir(parents=True, exist_ok=True)
    sizes = {"train": n_train, "val": n_eval, "test": n_eval}
    earlier: set[str] = set()  # splits in order: val and test items are new to train, test items new to val
    data = {split: generate_split(out, split, sizes[split], seed, pools[split], difficulty, earlier)
            for split in SPLITS}
    for split, per_domain in data.items():
        for domain, rows in per_domain.items():
            (out / domain).mkdir(exist_ok=True)
            (out / domain / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (out / "README.md").write_text(readme(out, data, n_train, n_eval, seed, pools, difficulty), encoding="utf-8")
    return data


def generate_media(out_dir: str | Path, difficulty: MediaDifficulty = MediaDifficulty(), seed: int = 0,
                   n_train: int = 2000, n_eval: int = 200, pools: dict[str, int] | None = None) -> Path:
    """The media set at `difficulty`, written once under `out_dir` (`out_dir/media-<hash>`) and reused; the
    shipped `data/media_tokenizer` covers it. Deterministic: the same arguments write the same bytes."""
    pools = pools or POOL_SIZES
    settings = {"generator": GENERATOR_VERSION, "difficulty": asdict(difficulty), "seed": seed,
                "n_train": n_train, "n_eval": n_eval, "pools": pools}
    return cached_set(out_dir, "media", settings, lambda path: generate(path, n_train, n_eval, seed, pools,
                                                                        difficulty))


def readme(
    out: Path, data: dict[str, dict[str, list[dict]]], n_train: int, n_eval: int, seed: int, pools: dict[str, int],
    difficulty: MediaDifficulty = MediaDifficulty(),
) -> str:
    files = [p for p in sorted(out.rglob("*")) if p.is_file() and p.name != "README.md"]
    size_mb = sum(p.stat().st_size for p in files) / 1e6
    kinds = Counter(p.suffix for p in files)
    command = "python -m lightning_moe.data.synthetic_media --out data/media"
    if (n_train, n_eval, seed) != (2000, 200, 0):
        command += f" --n-train {n_train} --n-eval {n_eval} --seed {seed}"
    if difficulty != MediaDifficulty():
        command += f" --difficulty '{json.dumps(asdict(difficulty))}'"
    knobs = [f"| `{f.name}` | {getattr(difficulty, f.name)} |" for f in fields(difficulty)]
    low, top = LOW_PITCH
    bands = {"high": f"{top * difficulty.pitch_ratio:g}-{2 * top * difficulty.pitch_ratio:g}", "low": f"{low:g}-{top:g}"}
    rows = []
    for domain, info in DOMAINS.items():
        counts = [len(data[s][domain]) for s in SPLITS]
        test_answers = Counter(r["conversations"][-1]["value"] for r in data["test"][domain])
        majority = max(test_answers.values()) / max(sum(test_answers.values()), 1)
        rows.append(
            f"| `{domain}` | {' + '.join(info.modalities)} | {info.question} | {' / '.join(info.answers)} | "
            f"{info.convention.format(**bands)} | {' / '.join(map(str, counts))} | {100 / len(info.answers):.0f}% | "
            f"{100 * majority:.1f}% |"
        )
    return "\n".join([
        "# media: synthetic audio, video and cross-modal instruction domains (Uni-MoE)",
        "",
        "Generated by `lightning_moe/data/synthetic_media.py` (read its docstring for the design); do not edit by hand.",
        "Regenerate (byte-identical with the same libsndfile/Pillow/zlib builds; also rewrites `data/media_tokenizer`):",
        "",
        "```bash",
        command,
        "```",
        "",
        "LLaVA format: `<domain>/{train,val,test}.jsonl`, single-turn, paths relative to this directory. Audio:",
        "`audio/<domain>/<split>/NNN.flac`, 1 s, 16 kHz mono, 16-bit FLAC. Video: 4 frames of 32x32 RGB PNG, as a",
        "directory (`videos/frames/<split>/NNN/`) or a list of frame files (`videos/pool/`, shared by the motion",
        "videos). Images: `images/<split>/NNN.png` (1-4 shapes on white). Batch format and features: docs/unimoe_data.md.",
        "",
        "| domain | inputs | question | answers | convention | train / val / test | chance | majority (test) |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Each split draws from its own pools ({pools['train']} / {pools['val']} / {pools['test']}"
        " distinct clips per audio domain, images, frame-count videos), drawn in the order train, val, test; an",
        "item whose bytes equal an earlier split's is drawn again, so no val or test item is a training item (nor",
        "a test item a val one). `motion`'s val and test use (shape, colour, row) combinations train never shows.",
        "Its left and right videos hold the same frames in opposite orders: pooling frames without order cannot",
        "beat chance.",
        "",
        "**Difficulty** (`MediaDifficulty` in the generator; `generate_media(out_dir, difficulty, seed)` writes a",
        "set at another one):",
        "",
        "| knob | value |",
        "|---|---|",
        *knobs,
        "",
        f"Total size: {size_mb:.2f} MB in {len(files)} files "
        f"({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}; seed {seed}).",
        "",
    ])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/media", help="data set directory")
    parser.add_argument("--tokenizer-out", default=None, help="tokenizer directory (default: <out>/../media_tokenizer)")
    parser.add_argument("--n-train", type=int, default=2000, help="train records per domain")
    parser.add_argument("--n-eval", type=int, default=200, help="val and test records per domain")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--difficulty", type=json.loads, default={},
                        help='MediaDifficulty fields as JSON, e.g. \'{"pitch_ratio": 1.5, "audio_noise": 0.05}\'')
    args = parser.parse_args(argv)
    out = Path(args.out)
    data = generate(out, args.n_train, args.n_eval, args.seed, difficulty=MediaDifficulty(**args.difficulty))
    tokenizer_out = Path(args.tokenizer_out) if args.tokenizer_out else out.parent / "media_tokenizer"
    build_tokenizer(tokenizer_out, vocabulary_texts())
    total = sum(len(rows) for per_domain in data.values() for rows in per_domain.values())
    print(f"wrote {total} records in {len(DOMAINS)} domains to {out}, tokenizer to {tokenizer_out}")


if __name__ == "__main__":
    main()

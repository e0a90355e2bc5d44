"""Deterministic generator of the shipped "shapes" data set, of harder variants of it, and of the tiny tokenizer.

    python -m lightning_moe.data.synthetic --out data/shapes      # also writes data/tokenizer

regenerates `data/shapes` and `data/tokenizer` byte-identically (same Pillow/zlib build): every
random choice comes from `random.Random` seeded with a string naming (seed, image group, split).
`generate_shapes(out_dir, difficulty, seed)` writes (once, cached by a hash of its settings) the set
at another `ShapesDifficulty`, for experiments: the shipped set is the defaults.

Images are 32x32 RGB PNGs: a 2x2 grid of 16x16 cells, each empty or holding one shape (circle,
square, triangle, cross; 10-12 px, shifted up to 2 px inside its cell) in one of four distinct
colours. Cells line up with the 8x8 patches of a tiny vision tower, so every answer is a function
of a few patches and a tiny model learns each domain on a CPU in minutes. Shipped domains (LLaVA
format, one JSONL per split):

- count: "How many shapes are there?" -> one .. four
- colour: "What colour is the shape at the top left?" -> red | green | blue | yellow
- pope: "Is there a shape at the top left?" -> yes | no (POPE-style object existence: absent
  objects, i.e. empty cells, asked about; exactly balanced, and independent of the number of
  shapes, so counting is no shortcut). Its own images with 1-3 shapes on the same white
  background. Asking for a kind or a colour ("Is there a circle / a red shape?") stayed exactly at
  chance at every setting tried, even alone and with one shape per image: that answer is an
  equality between a question word and the image content, which has no first-order signal (each
  alone says nothing about yes/no, an XOR-like saddle), whereas a cell word only routes attention
  to the cells it names and the content there decides, as in `colour`, which is learnt.
- position_lr / position_tb: the SAME question "Where is the red shape?" answered under two
  conventions: left | right on light-grey images, top | bottom on dark images. The background
  is the only cue to the convention, so one shared low-capacity adapter must spend capacity on
  the switch: the conflicting pair for experiments on mixtures of LoRA experts.

count and colour ask about the same white-background images (as LLaVA asks several tasks
about one image); each position domain has its own images with one shape each by default
(`ShapesDifficulty.distractors` adds others): with two or three shapes, binding the asked colour to
its shape was not learnt by the quickstart's from-scratch model in its CPU budget (three shapes:
stuck at the 66.5% "side with most shapes" shortcut; two: at chance), while one shape is learnt to
~100% and keeps the conflict between the conventions, which only the background resolves.

Held out: val and test never show an image of an earlier split. Images are drawn split by split
(train, val, test), and a val or test image whose PNG bytes equal an image of an earlier split is
drawn again (same answer, next random draw), so no val or test item (image bytes + question) is
in train, and no test item in val. One-shape position images are where the image space is small
(a cell, colour and kind: 64 images at fixed place and size); the shape's size (10-12 px) and its
shift inside the cell (up to 2 px each way) make 4800 of them, so the held-out splits are new
images, not recall. A difficulty whose image space is too small for disjoint splits is an error.

Difficulty (`ShapesDifficulty`, every knob checked): how many conventions share the position question
(`conventions`: 2 ships, up to 4 with the mirrored `position_rl` on beige and `position_bt` on teal
images), distractor shapes in position images, shift and size range of shapes, colour noise per shape,
pixel noise per image, the largest number of shapes in count / colour / pope images, and
`cooccurrence`, which adds the domain below (not shipped: every shipped config trains on every domain
folder of `data/shapes`):

- pope_cooccur: "Is there a circle in the image?" -> yes | no, on white images of 2-3 shapes. In
  train and val a `cooccurrence` fraction of the images with a circle hold a square too, and only
  the remaining fraction of the images without one do (so "a square is there" answers right that
  often). Test asks about images that hold a square and no circle (`no`, the
  hallucination bait) and images with a circle (`yes`, with a square as often as in train), half
  each: a model that learnt the co-occurrence instead of the circle says `yes` to the bait, seen
  in POPE's precision and yes-ratio. The question is fixed, so the answer is the presence of one
  kind anywhere: a first-order signal, unlike the kind-equality questions above.

Preference pairs (RLAIF-V style, for preference distillation) are derived from the records above,
so they follow any change to the questions: `preference/<domain>/<split>.jsonl` holds, per record,
the same image and question with `chosen` = the correct answer and `rejected` = a wrong one (the
other answer of a yes/no or two-way domain, i.e. the hallucinated one on `pope`).
The generator also writes `README.md` with the statistics of what it wrote.
"""

import argparse
import hashlib
import io
import json
import os
import random
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lightning_moe.data.records import human_turn
from lightning_moe.modalities import modalities

IMAGE_SIZE, CELL = 32, 16
MAX_SIZE = 12  # the largest shape: a 12x12 box, 2 px from each side of its 16x16 cell
CELLS = {(0, 0): "top left", (0, 1): "top right", (1, 0): "bottom left", (1, 1): "bottom right"}  # (row, col)
COLOURS = {"red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 230), "yellow": (245, 205, 20)}
SHAPES = ("circle", "square", "triangle", "cross")
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
SPLITS = ("train", "val", "test")
COOCCUR_PAIR = ("circle", "square")  # pope_cooccur: the asked kind, and the kind it usually comes with


@dataclass(frozen=True)
class ShapesDifficulty:
    """What the generated shapes set asks of a model; the shipped `data/shapes` is the defaults."""

    conventions: int = 2  # position domains sharing "Where is the <colour> shape?": 1-4 of `POSITION_DOMAINS`
    distractors: int = 0  # shapes of other colours in each position image besides the asked one: 0-3
    jitter: int = 2  # each shape shifts by up to this many pixels each way inside its cell: 0-2
    min_size: int = 10  # shapes are min_size..12 px wide: 4-12
    colour_noise: int = 0  # each shape's RGB shifts by up to this much per channel: 0-60 (colours stay apart)
    pixel_noise: int = 0  # each pixel's RGB shifts by up to this much per channel: 0-60
    max_shapes: int = 4  # count / colour images hold 1..max_shapes shapes, pope's 1..min(3, max_shapes): 1-4
    # pope_cooccur's co-occurrence of circle and square in train and val: 0.5-1; None: no such domain
    cooccurrence: float | None = None

    def __post_init__(self):
        bounds = {"conventions": (1, 4), "distractors": (0, 3), "jitter": (0, 2), "min_size": (4, MAX_SIZE),
                  "colour_noise": (0, 60), "pixel_noise": (0, 60), "max_shapes": (1, 4)}
        for name, (low, high) in bounds.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"ShapesDifficulty.{name} must be an integer in [{low}, {high}], got {value!r}")
        c = self.cooccurrence
        if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float)) or not 0.5 <= c <= 1):
            raise ValueError(f"ShapesDifficulty.cooccurrence must be None or a number in [0.5, 1], got {c!r}")

    def domains(self) -> tuple[str, ...]:
        """The domains a set at this difficulty holds."""
        cooccur = ("pope_cooccur",) if self.cooccurrence is not None else ()
        return ("count", "colour", "pope", *POSITION_DOMAINS[: self.conventions], *cooccur)


@dataclass(frozen=True)
class Style:
    """An image group: its background colour and the domains that ask about its images."""

    background: tuple[int, int, int]
    description: str


STYLES = {
    "white": Style((255, 255, 255), "white background, 1-{max_shapes} shapes"),
    "objects": Style((255, 255, 255), "white background, 1-{pope_shapes} shapes"),
    "grey": Style((170, 170, 170), "light-grey background, {position_shapes}"),
    "dark": Style((40, 40, 40), "dark background, {position_shapes}"),
    "beige": Style((215, 195, 150), "beige background, {position_shapes}"),
    "teal": Style((30, 90, 100), "teal background, {position_shapes}"),
    "cooccur": Style((255, 255, 255), "white background, 2-3 shapes"),
}


@dataclass(frozen=True)
class DomainInfo:
    style: str  # key of STYLES: which images the domain asks about
    question: str  # the question template, for the README
    answers: tuple[str, ...]
    convention: str


WHERE = "Where is the {colour} shape?"
DOMAINS = {  # every domain the generator can write; `ShapesDifficulty.domains` picks a set's
    "count": DomainInfo("white", "How many shapes are there?", tuple(NUMBERS.values()), "number of shapes, as a word"),
    "colour": DomainInfo(
        "white", "What colour is the shape at the {cell}?", tuple(COLOURS), "colour of the shape in that cell"
    ),
    "pope": DomainInfo(
        "objects", "Is there a shape at the {cell}?", ("yes", "no"), "object existence, yes/no balanced (POPE)"
    ),
    "position_lr": DomainInfo("grey", WHERE, ("left", "right"), "the column of that shape: left / right"),
    "position_tb": DomainInfo("dark", WHERE, ("top", "bottom"), "the row of that shape: top / bottom"),
    "position_rl": DomainInfo("beige", WHERE, ("left", "right"), "mirrored column: right / left"),
    "position_bt": DomainInfo("teal", WHERE, ("top", "bottom"), "mirrored row: bottom / top"),
    "pope_cooccur": DomainInfo(
        "cooccur", f"Is there a {COOCCUR_PAIR[0]} in the image?", ("yes", "no"),
        f"{COOCCUR_PAIR[0]} present; test's `no` images hold the co-occurring {COOCCUR_PAIR[1]}",
    ),
}
# position domain -> (which coordinate of the shape's cell answers: 0 row / 1 column, the answer per value)
POSITION_ANSWERS = {"position_lr": (1, ("left", "right")), "position_tb": (0, ("top", "bottom")),
                    "position_rl": (1, ("right", "left")), "position_bt": (0, ("bottom", "top"))}
POSITION_DOMAINS = tuple(POSITION_ANSWERS)
SHIPPED_DOMAINS = ShapesDifficulty().domains()

# ----- images --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    row: int
    col: int
    dx: int = 0  # shift in pixels from the shape's centred place in its cell (may leave the cell: video motion)
    dy: int = 0
    size: int = MAX_SIZE  # width and height of its box
    tint: tuple[int, int, int] = (0, 0, 0)  # added to the colour's RGB (colour noise)


def render(shapes: list[Shape], background: tuple[int, int, int]) -> Image.Image:
    """The shapes drawn on their cells."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    pen = ImageDraw.Draw(image)
    for shape in shapes:
        s, centring = shape.size, 2 + (MAX_SIZE - shape.size) // 2
        x, y = shape.col * CELL + centring + shape.dx, shape.row * CELL + centring + shape.dy
        fill = tuple(min(255, max(0, v + t)) for v, t in zip(COLOURS[shape.colour], shape.tint))
        if shape.kind == "circle":
            pen.ellipse((x, y, x + s - 1, y + s - 1), fill=fill)
        elif shape.kind == "square":
            pen.rectangle((x + 1, y + 1, x + s - 2, y + s - 2), fill=fill)
        elif shape.kind == "triangle":
            pen.polygon([(x + (s - 1) / 2, y), (x, y + s - 1), (x + s - 1, y + s - 1)], fill=fill)
        else:  # cross: two bars a third of the box wide
            bar = max(2, s // 3)
            low = (s - bar) // 2
            pen.rectangle((x + low, y, x + low + bar - 1, y + s - 1), fill=fill)
            pen.rectangle((x, y + low, x + s - 1, y + low + bar - 1), fill=fill)
    return image


def draw(shapes: list[Shape], background: tuple[int, int, int], noise: np.ndarray | None = None) -> bytes:
    """PNG bytes of the shapes on their cells, plus `noise` (int, (32, 32, 3)) on every pixel if given."""
    image = render(shapes, background)
    if noise is not None:
        pixels = np.asarray(image, dtype=np.int16) + noise
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def balanced(rng: random.Random, values: list, n: int) -> list:
    """n values, each as often as possible equally often, shuffled: exact answer balance."""
    out = (values * (n // len(values) + 1))[:n]
    rng.shuffle(out)
    return out


def place(rng: random.Random, d: ShapesDifficulty, kind: str, colour: str, cell: tuple[int, int]) -> Shape:
    """A shape in `cell` with the difficulty's random shift, size and colour noise."""
    shift = lambda: rng.randint(-d.jitter, d.jitter)  # noqa: E731
    tint = tuple(rng.randint(-d.colour_noise, d.colour_noise) for _ in range(3)) if d.colour_noise else (0, 0, 0)
    return Shape(kind, colour, *cell, dx=shift(), dy=shift(), size=rng.randint(d.min_size, MAX_SIZE), tint=tint)


def pixel_noise(rng: random.Random, d: ShapesDifficulty) -> np.ndarray | None:
    if not d.pixel_noise:
        return None
    return np.random.default_rng(rng.getrandbits(64)).integers(-d.pixel_noise, d.pixel_noise + 1,
                                                               (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.int16)


# An image maker draws one image for its target answer(s): (shapes, {domain: (question, answer)}).
Questions = dict[str, tuple[str, str]]


def white_image(rng: random.Random, d: ShapesDifficulty, count: int, colour: str) -> tuple[list[Shape], Questions]:
    """For count / colour: `count` shapes, the asked one of `colour`."""
    cells = rng.sample(sorted(CELLS), count)
    colours = [rng.choice(list(COLOURS)) for _ in cells]
    asked = rng.randrange(count)
    colours[asked] = colour
    shapes = [place(rng, d, rng.choice(SHAPES), c, cell) for c, cell in zip(colours, cells)]
    return shapes, {"count": ("How many shapes are there?", NUMBERS[count]),
                    "colour": (f"What colour is the shape at the {CELLS[cells[asked]]}?", colour)}


def object_image(rng: random.Random, d: ShapesDifficulty, count: int, answer: str) -> tuple[list[Shape], Questions]:
    """For pope, 1-3 shapes (so an empty cell exists): the asked cell holds a shape iff `answer` is yes."""
    cells = rng.sample(sorted(CELLS), count)
    shapes = [place(rng, d, rng.choice(SHAPES), rng.choice(list(COLOURS)), cell) for cell in cells]
    asked = rng.choice(cells if answer == "yes" else sorted(set(CELLS) - set(cells)))
    return shapes, {"pope": (f"Is there a shape at the {CELLS[asked]}?", answer)}


def position_answer(domain: str, row: int, col: int) -> str:
    axis, words = POSITION_ANSWERS[domain]
    return words[(row, col)[axis]]


def position_image(rng: random.Random, d: ShapesDifficulty, domain: str, answer: str) -> tuple[list[Shape], Questions]:
    """For a position domain: the asked shape in a cell that `answer` names, plus `d.distractors` other shapes
    of other colours (distinct colours, so "the red shape" is unique) in other cells."""
    cell = rng.choice([c for c in sorted(CELLS) if position_answer(domain, *c) == answer])
    cells = [cell, *rng.sample(sorted(set(CELLS) - {cell}), d.distractors)]
    colours = rng.sample(list(COLOURS), len(cells))
    shapes = [place(rng, d, rng.choice(SHAPES), c, where) for c, where in zip(colours, cells)]
    return shapes, {domain: (WHERE.format(colour=colours[0]), answer)}


def cooccur_image(rng: random.Random, d: ShapesDifficulty, split: str, answer: str) -> tuple[list[Shape], Questions]:
    """For pope_cooccur: 2-3 shapes, whether the asked kind is there given by `answer` and its companion's
    presence by the split (module docstring); the rest are of the other kinds, so the count says nothing."""
    asked, companion = COOCCUR_PAIR
    others = [k for k in SHAPES if k not in COOCCUR_PAIR]
    with_companion = rng.random() < d.cooccurrence
    if answer == "yes":
        kinds = [asked, companion] if with_companion else [asked]
    elif split == "test":
        kinds = [companion]  # the bait: the usual companion without the asked kind
    else:
        kinds = [] if with_companion else [companion]
    kinds += [rng.choice(others) for _ in range(rng.choice((2, 3)) - len(kinds))]
    cells = rng.sample(sorted(CELLS), len(kinds))
    shapes = [place(rng, d, kind, rng.choice(list(COLOURS)), cell) for kind, cell in zip(kinds, cells)]
    return shapes, {"pope_cooccur": (DOMAINS["pope_cooccur"].question, answer)}


def image_plans(d: ShapesDifficulty, split: str, n: int) -> dict[str, Callable]:
    """style -> function(rng) that lists, per image, a maker of that image: `maker(rng) -> (shapes, questions)`."""
    plans = {
        "white": lambda rng: [lambda r, c=count, a=colour: white_image(r, d, c, a) for count, colour in
                              zip(balanced(rng, list(range(1, d.max_shapes + 1)), n), balanced(rng, list(COLOURS), n))],
        "objects": lambda rng: [lambda r, c=count, a=answer: object_image(r, d, c, a) for count, answer in
                                zip(balanced(rng, list(range(1, min(3, d.max_shapes) + 1)), n),
                                    balanced(rng, ["yes", "no"], n))],
    }
    for domain in POSITION_DOMAINS[: d.conventions]:
        words = list(POSITION_ANSWERS[domain][1])
        plans[DOMAINS[domain].style] = lambda rng, dom=domain, w=words: [
            lambda r, a=answer: position_image(r, d, dom, a) for answer in balanced(rng, w, n)]
    if d.cooccurrence is not None:
        plans["cooccur"] = lambda rng: [lambda r, a=answer: cooccur_image(r, d, split, a)
                                        for answer in balanced(rng, ["yes", "no"], n)]
    return plans


MAX_DRAWS = 1000  # draws of one held-out image before its image space counts as exhausted by earlier splits

# ----- data set ------------------------------------------------------------------------------


def _record(domain: str, split: str, index: int, image: str, question: str, answer: str) -> dict:
    return {
        "id": f"{domain}-{split}-{index:05d}",
        "image": image,
        "conversations": [
            {"from": "human", "value": human_turn(question, {"image": 1})},
            {"from": "gpt", "value": answer},
        ],
    }


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def draw_new(draw_once: Callable[[], tuple[bytes, Any]], earlier: set[str], what: str) -> tuple[bytes, Any]:
    """`draw_once()` -> (file bytes, anything), called again while the bytes are among `earlier` (digests of
    earlier splits' files): the held-out splits' guarantee. Raises ValueError naming `what` when `MAX_DRAWS`
    draws all fall among them (the space of distinct items is too small for disjoint splits)."""
    for _ in range(MAX_DRAWS):
        data, payload = draw_once()
        if digest(data) not in earlier:
            return data, payload
    raise ValueError(f"{what}: {MAX_DRAWS} draws gave only items that earlier splits hold; the space of distinct "
                     "items is too small for disjoint splits (widen it: jitter, size range, noise; or write fewer "
                     "records)")


def generate_split(out: Path, split: str, n: int, seed: int, difficulty: ShapesDifficulty = ShapesDifficulty(),
                   earlier: set[str] | None = None) -> dict[str, list[dict]]:
    """Write the images of one split under `out/images` and return its records per domain.

    `earlier`: digests of the earlier splits' images; an image among them is drawn again, and this split's
    digests are added to it.
    """
    earlier = set() if earlier is None else earlier
    records: dict[str, list[dict]] = {d: [] for d in difficulty.domains()}
    written: set[str] = set()
    for style, plan in image_plans(difficulty, split, n).items():
        rng = random.Random(f"{seed}:{style}:{split}")
        background = STYLES[style].background
        for i, maker in enumerate(plan(rng)):
            def draw_once(maker=maker):
                shapes, questions = maker(rng)
                return draw(shapes, background, pixel_noise(rng, difficulty)), questions

            png, questions = draw_new(draw_once, earlier, f"shapes {split} images of style {style!r} at {difficulty}")
            written.add(digest(png))
            rel = f"images/{style}/{split}/{i:05d}.png"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            (out / rel).write_bytes(png)
            for domain, (question, answer) in questions.items():
                records[domain].append(_record(domain, split, i, rel, question, answer))
    earlier |= written
    return records


PREFERENCE_DIR = "preference"  # preference/<domain>/<split>.jsonl; not a domain folder, so discovery skips it


def preference_pairs(domain: str, records: list[dict], seed: int = 0) -> list[dict]:
    """One RLAIF-V style pair per record: same image and prompt, `chosen` = its answer, `rejected` = a wrong one.

    Built from the records themselves (not from the question templates), so regenerating the data
    with other questions keeps the pairs consistent. Domains with more than two answers draw the
    wrong answer from a generator seeded by (seed, record id).
    """
    answers = DOMAINS[domain].answers
    pairs = []
    for record in records:
        *prompt, last = record["conversations"]
        wrong = [a for a in answers if a != last["value"]]
        rejected = wrong[0] if len(wrong) == 1 else random.Random(f"{seed}:preference:{record['id']}").choice(wrong)
        pairs.append({"id": record["id"], "image": record["image"], "conversations": prompt,
                      "chosen": last["value"], "rejected": rejected})
    return pairs


def generate(out: str | Path, n_train: int = 2000, n_eval: int = 200, seed: int = 0,
             difficulty: ShapesDifficulty = ShapesDifficulty()) -> dict[str, dict[str, list[dict]]]:
    """Write the whole data set (images, JSONL per domain and split, README) and return the records."""
    out = Path(out)
    # only what this generator owns is removed, so stale images of a larger run cannot linger.
    for owned in ["images", PREFERENCE_DIR, *DOMAINS]:
        if (out / owned).is_dir():
            shutil.rmtree(out / owned)
    out.mkdir(parents=True, exist_ok=True)
    sizes = {"train": n_train, "val": n_eval, "test": n_eval}
    earlier: set[str] = set()  # splits in order: val and test images are new to train, test images new to val
    data = {split: generate_split(out, split, sizes[split], seed, difficulty, earlier) for split in SPLITS}
    for split, per_domain in data.items():
        for domain, records in per_domain.items():
            (out / domain).mkdir(exist_ok=True)
            lines = "".join(json.dumps(r) + "\n" for r in records)
            (out / domain / f"{split}.jsonl").write_text(lines, encoding="utf-8")
            pairs = preference_pairs(domain, records, seed)
            (out / PREFERENCE_DIR / domain).mkdir(parents=True, exist_ok=True)
            lines = "".join(json.dumps(r) + "\n" for r in pairs)
            (out / PREFERENCE_DIR / domain / f"{split}.jsonl").write_text(lines, encoding="utf-8")
    (out / "README.md").write_text(readme(out, data, n_train, n_eval, seed, difficulty), encoding="utf-8")
    return data


SETTINGS_FILE = "settings.json"
# part of every cached set's settings: raise it whenever a change to the generator changes what it writes,
# so that no experiment reads a set cached by an earlier generator
GENERATOR_VERSION = 2


def cached_set(out_dir: str | Path, name: str, settings: dict, write: Callable[[Path], object]) -> Path:
    """`out_dir/<name>-<hash of settings>`, written by `write(directory)` unless an earlier call wrote it.

    Written under a temporary name and renamed when complete, so a crash leaves no half set behind and two
    runs writing the same set at once both end with the same complete one. Its `settings.json` holds the
    settings; a directory of that name holding other settings is an error.
    """
    text = json.dumps(settings, sort_keys=True, indent=1) + "\n"
    out_dir = Path(out_dir)
    path = out_dir / f"{name}-{digest(text.encode())[:16]}"
    if not path.is_dir():
        out_dir.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=out_dir))
        try:
            write(scratch)
            (scratch / SETTINGS_FILE).write_text(text, encoding="utf-8")
            os.rename(scratch, path)
        except OSError:
            if not (path / SETTINGS_FILE).is_file():  # not another run that finished the same set first
                raise
        finally:
            if scratch.exists():
                shutil.rmtree(scratch)
    stored = path / SETTINGS_FILE
    if not stored.is_file() or stored.read_text(encoding="utf-8") != text:
        raise ValueError(f"{path} exists but does not hold the set of these settings ({stored} differs or is "
                         f"missing): remove it to regenerate")
    return path


def generate_shapes(out_dir: str | Path, difficulty: ShapesDifficulty = ShapesDifficulty(), seed: int = 0,
                    n_train: int = 2000, n_eval: int = 200) -> Path:
    """The shapes set at `difficulty` (domains `difficulty.domains()`), written once under `out_dir` and reused.

    Returns its root (`out_dir/shapes-<hash>`), to give as the data root (`--data.init_args.root`); the
    shipped tokenizer (`data/tokenizer`) covers every domain's words. Deterministic: the same arguments
    write the same bytes.
    """
    settings = {"generator": GENERATOR_VERSION, "difficulty": asdict(difficulty), "seed": seed,
                "n_train": n_train, "n_eval": n_eval}
    return cached_set(out_dir, "shapes", settings,
                      lambda path: generate(path, n_train, n_eval, seed, difficulty))


def _style_description(style: str, d: ShapesDifficulty) -> str:
    extra = d.distractors
    position_shapes = "1 shape" if not extra else f"1 shape + {extra} distractor{'s' if extra > 1 else ''}"
    return STYLES[style].description.format(max_shapes=d.max_shapes, pope_shapes=min(3, d.max_shapes),
                                            position_shapes=position_shapes)


def readme(out: Path, data: dict[str, dict[str, list[dict]]], n_train: int, n_eval: int, seed: int,
           difficulty: ShapesDifficulty = ShapesDifficulty()) -> str:
    files = [p for p in sorted(out.rglob("*")) if p.is_file() and p.name != "README.md"]
    size_mb = sum(p.stat().st_size for p in files) / 1e6
    if difficulty == ShapesDifficulty():
        command = "python -m lightning_moe.data.synthetic --out data/shapes"
        if (n_train, n_eval, seed) != (2000, 200, 0):
            command += f" --n-train {n_train} --n-eval {n_eval} --seed {seed}"
    else:
        command = (f"python -c 'from lightning_moe.data.synthetic import *; generate_shapes(\"OUT_DIR\", "
                   f"{difficulty}, seed={seed}, n_train={n_train}, n_eval={n_eval})'")
    rows = []
    for domain in difficulty.domains():
        info = DOMAINS[domain]
        counts = [len(data[s][domain]) for s in SPLITS]
        test_answers = Counter(r["conversations"][-1]["value"] for r in data["test"][domain])
        majority = max(test_answers.values()) / max(sum(test_answers.values()), 1)
        rows.append(
            f"| `{domain}` | {info.question} | {' / '.join(info.answers)} | {info.convention} | "
            f"{_style_description(info.style, difficulty)} | {' / '.join(map(str, counts))} | "
            f"{100 / len(info.answers):.0f}% | {100 * majority:.1f}% |"
        )
    knobs = [f"| `{f.name}` | {getattr(difficulty, f.name)} |" for f in fields(difficulty)]
    return "\n".join(
        [
            "# shapes: a synthetic multi-domain image-instruction set",
            "",
            "Generated by `lightning_moe/data/synthetic.py` (read its docstring for the design); do not edit by hand.",
            "Regenerate (byte-identical with the same Pillow/zlib build; the command line also rewrites",
            "`data/tokenizer`):",
            "",
            "```bash",
            command,
            "```",
            "",
            "LLaVA format: `<domain>/{train,val,test}.jsonl`, one record per line, single-turn, image paths relative",
            "to this directory (`images/<style>/<split>/NNNNN.png`, 32x32 RGB, a 2x2 grid of 16x16 cells holding",
            "circles, squares, triangles or crosses in red, green, blue or yellow). Answers are one or two words, so",
            "exact match is meaningful.",
            "",
            "| domain | question | answers | convention | images | train / val / test | chance | majority (test) |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            "Chance: uniform guess over the domain's answers; majority: always answering the most frequent test",
            "answer.",
            "`{cell}` is top left / top right / bottom left / bottom right (for `pope`'s `no`, an empty cell),",
            "`{colour}` the colour of the position image's asked shape.",
            "",
            "**Held out.** No val or test image (its PNG bytes) is an image of train, and no test image one of val:",
            "the splits are drawn in that order and a held-out image equal to an earlier one is drawn again, so no",
            "held-out item (image + question) is a training item.",
            "",
            "**Difficulty** (`ShapesDifficulty` in the generator; `generate_shapes(out_dir, difficulty, seed)` writes",
            "a set at another one):",
            "",
            "| knob | value |",
            "|---|---|",
            *knobs,
            "",
            "**Conflicting domains.** The position domains ask the same question, `Where is the <colour> shape?`,",
            "about the same kind of layout; `position_lr` answers with the column (left / right) on light-grey",
            "images, `position_tb` with the row (top / bottom) on dark images (`conventions` above 2 adds the",
            "mirrored `position_rl` on beige and `position_bt` on teal images). Only the background tells which",
            "convention applies, so a single shared low-capacity adapter trained on them has to encode the switch,",
            "while a mixture of experts can route each style to its own expert.",
            "`count` and `colour` ask about the same white-background images; `pope` has its own (so an empty cell,",
            "the absent object, can be asked about; yes/no is independent of the number of shapes).",
            "",
            f"**Preference pairs.** `{PREFERENCE_DIR}/<domain>/<split>.jsonl` (RLAIF-V style, for preference",
            "distillation) hold one pair per record above: the same image and question (`conversations` ends with",
            "the question), `chosen` = the correct answer, `rejected` = a wrong one (the other answer in two-way",
            "domains, so on `pope` the hallucinated one; a seeded random wrong answer in `count` / `colour`).",
            "",
            "**Tokenizer.** `data/tokenizer` (written by the command line) is word-level over the vocabulary of every",
            "domain the generator can write (lower-cased; `<unk>` for anything else) with `<image>` / `<audio>` /",
            "`<video>` and the chat roles as special tokens. Its chat template renders",
            "`<s><|user|>question<|end|><|assistant|>answer<|end|>`; `<|end|>` is the eos token, so greedy generation",
            "stops after the answer, and every answer above decodes back to itself exactly.",
            "",
            f"Total size of images and JSONL files: {size_mb:.2f} MB in {len(files)} files (seed {seed}).",
            "",
        ]
    )


# ----- tokenizer -----------------------------------------------------------------------------

ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
END_OF_TURN = "<|end|>"  # also the eos token, so greedy generation stops after an answer
SPECIAL_TOKENS = ("<unk>", "<pad>", "<s>", "</s>", *(spec.placeholder for spec in modalities()), *ROLE_TOKENS,
                  END_OF_TURN)

# Each message is "<|role|>" + content + "<|end|>"; the generation prompt is "<|assistant|>".
# Prefix-stable by construction (see lightning_moe/data/conversation.py).
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('unknown role: ' + message['role']) -}}"
    "{%- endif -%}"
    "{{- '<|' + message['role'] + '|>' + message['content'] + '<|end|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)


# Beyond the generated texts: a short system prompt and digits (answers in digit conventions).
EXTRA_TEXTS = ("Answer the question with a single word.", "0 1 2 3 4 5 6 7 8 9")


def vocabulary_texts() -> list[str]:
    """Every question and answer the generator can write (the tokenizer must cover them all), plus `EXTRA_TEXTS`."""
    texts = ["How many shapes are there?", *EXTRA_TEXTS]
    texts += [f"What colour is the shape at the {cell}?" for cell in CELLS.values()]
    texts += [f"Is there a shape at the {cell}?" for cell in CELLS.values()]
    # earlier pope wordings stay in the vocabulary, so token ids do not move when the data changes (pope_cooccur
    # asks one of them)
    texts += [f"Is there a {shape} in the image?" for shape in SHAPES]
    texts += [f"Is there a {colour} shape in the image?" for colour in COLOURS]
    texts += [f"Where is the {colour} shape?" for colour in COLOURS]
    return texts + [answer for info in DOMAINS.values() for answer in info.answers]


def build_tokenizer(out: str | Path, extra_texts: list[str] | tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the synthetic vocabulary, saved as a HF tokenizer directory.

    Lower-cased words and punctuation are tokens; decoding joins them with spaces, so every
    (lower-case, single-spaced) answer decodes back to itself exactly. `extra_texts` (the media
    domains' questions and answers, `synthetic_media.py`) add their new words after the shapes' words,
    so a shapes token keeps its id in both tokenizers.
    """
    normalizer = normalizers.Lowercase()
    pre_tokenizer = pre_tokenizers.Whitespace()

    def words_of(texts) -> set[str]:
        return {w for text in texts for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))}

    words = sorted(words_of(vocabulary_texts()))
    words += sorted(words_of(extra_texts) - set(words))
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizer
    backend.pre_tokenizer = pre_tokenizer
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token=END_OF_TURN,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<unk>", "<pad>", "<s>", END_OF_TURN)],
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer.save_pretrained(str(out))
    return tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/shapes", help="data set directory")
    parser.add_argument("--tokenizer-out", default=None, help="tokenizer directory (default: <out>/../tokenizer)")
    parser.add_argument("--n-train", type=int, default=2000, help="train records per domain")
    parser.add_argument("--n-eval", type=int, default=200, help="val and test records per domain")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--difficulty", type=json.loads, default={},
                        help='ShapesDifficulty fields as JSON, e.g. \'{"jitter": 1, "cooccurrence": 0.9}\'')
    args = parser.parse_args(argv)
    out = Path(args.out)
    data = generate(out, args.n_train, args.n_eval, args.seed, ShapesDifficulty(**args.difficulty))
    tokenizer_out = Path(args.tokenizer_out) if args.tokenizer_out else out.parent / "tokenizer"
    build_tokenizer(tokenizer_out)
    total = sum(len(records) for per_domain in data.values() for records in per_domain.values())
    print(f"wrote {total} records in {len(data['train'])} domains to {out}, tokenizer to {tokenizer_out}")


if __name__ == "__main__":
    main()

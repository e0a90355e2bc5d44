"""Deterministic generator of the shipped "shapes" data set and of the tiny tokenizer for it.

    python -m lightning_moe.data.synthetic --out data/shapes      # also writes data/tokenizer

regenerates `data/shapes` and `data/tokenizer` byte-identically (same Pillow/zlib build): every
random choice comes from `random.Random` seeded with a string naming (seed, image group, split).

Images are 32x32 RGB PNGs: a 2x2 grid of 16x16 cells, each empty or holding one large shape
(circle, square, triangle, cross) in one of four distinct colours. Cells line up with the
8x8 patches of a tiny vision tower, so every answer is a function of a few patches and a tiny
model learns each domain on a CPU in minutes. Five domains (LLaVA format, one JSONL per split):

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
about one image); the position pair has its own images with one shape each (`POSITION_SHAPES`):
with two or three shapes, binding the asked colour to its shape was not learnt by the quickstart's
from-scratch model in its CPU budget (three shapes: stuck at the 66.5% "side with most shapes"
shortcut; two: at chance), while one shape is learnt to ~100% and keeps the conflict between the
two conventions, which only the background resolves.
Preference pairs (RLAIF-V style, for preference distillation) are derived from the records above,
so they follow any change to the questions: `preference/<domain>/<split>.jsonl` holds, per record,
the same image and question with `chosen` = the correct answer and `rejected` = a wrong one (the
other answer of a yes/no or two-way domain, i.e. the hallucinated one on `pope`).
The generator also writes `README.md` with the statistics of what it wrote.
"""

import argparse
import io
import json
import random
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lightning_moe.data.records import human_turn
from lightning_moe.modalities import modalities

IMAGE_SIZE, CELL = 32, 16
CELLS = {(0, 0): "top left", (0, 1): "top right", (1, 0): "bottom left", (1, 1): "bottom right"}  # (row, col)
COLOURS = {"red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 230), "yellow": (245, 205, 20)}
SHAPES = ("circle", "square", "triangle", "cross")
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Style:
    """An image group: its background colour and the domains that ask about its images."""

    background: tuple[int, int, int]
    description: str


STYLES = {
    "white": Style((255, 255, 255), "white background, 1-4 shapes"),
    "objects": Style((255, 255, 255), "white background, 1-3 shapes"),
    "grey": Style((170, 170, 170), "light-grey background, 1 shape"),
    "dark": Style((40, 40, 40), "dark background, 1 shape"),
}


@dataclass(frozen=True)
class DomainInfo:
    style: str  # key of STYLES: which images the domain asks about
    question: str  # the question template, for the README
    answers: tuple[str, ...]
    convention: str


DOMAINS = {
    "count": DomainInfo("white", "How many shapes are there?", tuple(NUMBERS.values()), "number of shapes, as a word"),
    "colour": DomainInfo(
        "white", "What colour is the shape at the {cell}?", tuple(COLOURS), "colour of the shape in that cell"
    ),
    "pope": DomainInfo(
        "objects", "Is there a shape at the {cell}?", ("yes", "no"), "object existence, yes/no balanced (POPE)"
    ),
    "position_lr": DomainInfo(
        "grey", "Where is the {colour} shape?", ("left", "right"), "the column of that shape: left / right"
    ),
    "position_tb": DomainInfo(
        "dark", "Where is the {colour} shape?", ("top", "bottom"), "the row of that shape: top / bottom"
    ),
}

# ----- images --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    row: int
    col: int


def draw(shapes: list[Shape], background: tuple[int, int, int], jitter: list[tuple[int, int]]) -> bytes:
    """PNG bytes of the shapes on their cells; `jitter` shifts each shape by (dx, dy) pixels."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), background)
    pen = ImageDraw.Draw(image)
    for shape, (dx, dy) in zip(shapes, jitter):
        x, y = shape.col * CELL + 2 + dx, shape.row * CELL + 2 + dy  # a 12x12 box inside the 16x16 cell
        fill = COLOURS[shape.colour]
        if shape.kind == "circle":
            pen.ellipse((x, y, x + 11, y + 11), fill=fill)
        elif shape.kind == "square":
            pen.rectangle((x + 1, y + 1, x + 10, y + 10), fill=fill)
        elif shape.kind == "triangle":
            pen.polygon([(x + 5.5, y), (x, y + 11), (x + 11, y + 11)], fill=fill)
        else:  # cross
            pen.rectangle((x + 4, y, x + 7, y + 11), fill=fill)
            pen.rectangle((x, y + 4, x + 11, y + 7), fill=fill)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def balanced(rng: random.Random, values: list, n: int) -> list:
    """n values, each as often as possible equally often, shuffled: exact answer balance."""
    out = (values * (n // len(values) + 1))[:n]
    rng.shuffle(out)
    return out


def _jitter(rng: random.Random, k: int) -> list[tuple[int, int]]:
    return [(rng.randint(-1, 1), rng.randint(-1, 1)) for _ in range(k)]


def white_images(rng: random.Random, n: int) -> Iterator[tuple[list[Shape], list[tuple[int, int]], dict]]:
    """Images for count / colour: (shapes, jitter, {domain: (question, answer)})."""
    counts = balanced(rng, list(NUMBERS), n)
    colour_answers = balanced(rng, list(COLOURS), n)
    for count, colour in zip(counts, colour_answers):
        cells = rng.sample(sorted(CELLS), count)
        kinds = [rng.choice(SHAPES) for _ in cells]
        colours = [rng.choice(list(COLOURS)) for _ in cells]
        asked = rng.randrange(count)
        colours[asked] = colour
        shapes = [Shape(k, c, r, col) for k, c, (r, col) in zip(kinds, colours, cells)]
        questions = {
            "count": ("How many shapes are there?", NUMBERS[count]),
            "colour": (f"What colour is the shape at the {CELLS[cells[asked]]}?", colour),
        }
        yield shapes, _jitter(rng, count), questions


def object_images(rng: random.Random, n: int) -> Iterator[tuple[list[Shape], list[tuple[int, int]], dict]]:
    """Images for pope, 1-3 shapes (so an empty cell exists): answers balanced and independent of the count."""
    counts = balanced(rng, [1, 2, 3], n)
    answers = balanced(rng, ["yes", "no"], n)
    for count, answer in zip(counts, answers):
        cells = rng.sample(sorted(CELLS), count)
        shapes = [Shape(rng.choice(SHAPES), rng.choice(list(COLOURS)), r, col) for r, col in cells]
        asked = rng.choice(cells if answer == "yes" else sorted(set(CELLS) - set(cells)))
        yield shapes, _jitter(rng, count), {"pope": (f"Is there a shape at the {CELLS[asked]}?", answer)}


POSITION_SHAPES = 1  # shapes per position image, each asked about once; more are not learnt in the quickstart's budget


def position_images(rng: random.Random, n: int) -> Iterator[tuple[list[Shape], list[tuple[int, int]]]]:
    """Images for a position domain: (shapes, jitter); every shape has its own colour and is asked about."""
    for _ in range(n):
        cells = rng.sample(sorted(CELLS), POSITION_SHAPES)
        colours = rng.sample(list(COLOURS), POSITION_SHAPES)  # distinct, so "the red shape" is unique (if more than one)
        shapes = [Shape(rng.choice(SHAPES), c, r, col) for c, (r, col) in zip(colours, cells)]
        yield shapes, _jitter(rng, POSITION_SHAPES)


def position_answer(domain: str, shape: Shape) -> str:
    if domain == "position_lr":
        return ("left", "right")[shape.col]
    return ("top", "bottom")[shape.row]


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


def generate_split(out: Path, split: str, n: int, seed: int) -> dict[str, list[dict]]:
    """Write the images of one split under `out/images` and return its records per domain."""
    records: dict[str, list[dict]] = {d: [] for d in DOMAINS}

    def save(style: str, index: int, png: bytes) -> str:
        rel = f"images/{style}/{split}/{index:05d}.png"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(png)
        return rel

    for style, images in (("white", white_images), ("objects", object_images)):
        rng = random.Random(f"{seed}:{style}:{split}")
        for i, (shapes, jitter, questions) in enumerate(images(rng, n)):
            image = save(style, i, draw(shapes, STYLES[style].background, jitter))
            for domain, (question, answer) in questions.items():
                records[domain].append(_record(domain, split, i, image, question, answer))

    for domain in ("position_lr", "position_tb"):
        style = DOMAINS[domain].style
        rng = random.Random(f"{seed}:{style}:{split}")
        n_images = -(-n // POSITION_SHAPES)  # ceil
        for i, (shapes, jitter) in enumerate(position_images(rng, n_images)):
            image = save(style, i, draw(shapes, STYLES[style].background, jitter))
            for shape in shapes:
                question = f"Where is the {shape.colour} shape?"
                records[domain].append(
                    _record(domain, split, len(records[domain]), image, question, position_answer(domain, shape))
                )
        records[domain] = records[domain][:n]
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


def generate(out: str | Path, n_train: int = 2000, n_eval: int = 200, seed: int = 0) -> dict[str, dict[str, list[dict]]]:
    """Write the whole data set (images, JSONL per domain and split, README) and return the records."""
    out = Path(out)
    # only what this generator owns is removed, so stale images of a larger run cannot linger.
    for owned in ["images", PREFERENCE_DIR, *DOMAINS]:
        if (out / owned).is_dir():
            shutil.rmtree(out / owned)
    out.mkdir(parents=True, exist_ok=True)
    sizes = {"train": n_train, "val": n_eval, "test": n_eval}
    data = {split: generate_split(out, split, sizes[split], seed) for split in SPLITS}
    for split, per_domain in data.items():
        for domain, records in per_domain.items():
            (out / domain).mkdir(exist_ok=True)
            lines = "".join(json.dumps(r) + "\n" for r in records)
            (out / domain / f"{split}.jsonl").write_text(lines, encoding="utf-8")
            pairs = preference_pairs(domain, records, seed)
            (out / PREFERENCE_DIR / domain).mkdir(parents=True, exist_ok=True)
            lines = "".join(json.dumps(r) + "\n" for r in pairs)
            (out / PREFERENCE_DIR / domain / f"{split}.jsonl").write_text(lines, encoding="utf-8")
    (out / "README.md").write_text(readme(out, data, n_train, n_eval, seed), encoding="utf-8")
    return data


def readme(out: Path, data: dict[str, dict[str, list[dict]]], n_train: int, n_eval: int, seed: int) -> str:
    files = [p for p in sorted(out.rglob("*")) if p.is_file() and p.name != "README.md"]
    size_mb = sum(p.stat().st_size for p in files) / 1e6
    command = "python -m lightning_moe.data.synthetic --out data/shapes"
    if (n_train, n_eval, seed) != (2000, 200, 0):
        command += f" --n-train {n_train} --n-eval {n_eval} --seed {seed}"
    rows = []
    for domain, info in DOMAINS.items():
        counts = [len(data[s][domain]) for s in SPLITS]
        test_answers = Counter(r["conversations"][-1]["value"] for r in data["test"][domain])
        majority = max(test_answers.values()) / max(sum(test_answers.values()), 1)
        rows.append(
            f"| `{domain}` | {info.question} | {' / '.join(info.answers)} | {info.convention} | "
            f"{STYLES[info.style].description} | {' / '.join(map(str, counts))} | "
            f"{100 / len(info.answers):.0f}% | {100 * majority:.1f}% |"
        )
    return "\n".join(
        [
            "# shapes: a synthetic multi-domain image-instruction set",
            "",
            "Generated by `lightning_moe/data/synthetic.py` (read its docstring for the design); do not edit by hand.",
            "Regenerate (byte-identical with the same Pillow/zlib build; also rewrites `data/tokenizer`):",
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
            "Chance: uniform guess over the domain's answers; majority: always answering the most frequent test answer.",
            "`{cell}` is top left / top right / bottom left / bottom right (for `pope`'s `no`, an empty cell),",
            "`{colour}` the colour of the position image's shape.",
            "",
            "**Conflicting domains.** `position_lr` and `position_tb` ask the same question, `Where is the <colour>",
            "shape?`, about the same kind of layout; `position_lr` answers with the column (left / right) on",
            "light-grey images, `position_tb` with the row (top / bottom) on dark images. Only the background tells",
            "which convention applies, so a single shared low-capacity adapter trained on both has to encode the",
            "switch, while a mixture of experts can route each style to its own expert.",
            "`count` and `colour` ask about the same white-background images; `pope` has its own (1-3 shapes, so an",
            "empty cell, the absent object, can be asked about; yes/no is independent of the number of shapes).",
            "",
            f"**Preference pairs.** `{PREFERENCE_DIR}/<domain>/<split>.jsonl` (RLAIF-V style, for preference",
            "distillation) hold one pair per record above: the same image and question (`conversations` ends with",
            "the question), `chosen` = the correct answer, `rejected` = a wrong one (the other answer in two-way",
            "domains, so on `pope` the hallucinated one; a seeded random wrong answer in `count` / `colour`).",
            "",
            "**Tokenizer.** `data/tokenizer` (written by the same command) is word-level over this vocabulary",
            "(lower-cased; `<unk>` for anything else) with `<image>` / `<audio>` / `<video>` and the chat roles as",
            "special tokens. Its chat template renders `<s><|user|>question<|end|><|assistant|>answer<|end|>`;",
            "`<|end|>` is the eos token, so greedy generation stops after the answer, and every answer above",
            "decodes back to itself exactly.",
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
    # earlier pope wordings stay in the vocabulary, so token ids do not move when the data changes
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
    args = parser.parse_args(argv)
    out = Path(args.out)
    data = generate(out, args.n_train, args.n_eval, args.seed)
    tokenizer_out = Path(args.tokenizer_out) if args.tokenizer_out else out.parent / "tokenizer"
    build_tokenizer(tokenizer_out)
    total = sum(len(records) for per_domain in data.values() for records in per_domain.values())
    print(f"wrote {total} records in {len(DOMAINS)} domains to {out}, tokenizer to {tokenizer_out}")


if __name__ == "__main__":
    main()

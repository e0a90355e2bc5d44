"""The synthetic shapes generator and the shipped data: deterministic, correct answers, within budget,
and exactly representable by the shipped tokenizer."""

import filecmp
import io
import json
from collections import Counter
from pathlib import Path

from PIL import Image

from lightning_moe.data import read_llava_records
from lightning_moe.data import synthetic as S
from tests.data.data_helpers import SHIPPED_DATA, SHIPPED_TOKENIZER

SPLIT_SIZES = {"train": 2000, "val": 200, "test": 200}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generator_is_deterministic(tmp_path):
    for run in ("a", "b"):
        S.main(["--out", str(tmp_path / run / "shapes"), "--n-train", "9", "--n-eval", "3"])
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a == b
    assert {"tokenizer/tokenizer.json", "tokenizer/chat_template.jinja", "shapes/README.md"} <= set(a)
    assert "shapes/pope/test.jsonl" in a and "shapes/images/dark/val/00000.png" in a


def _cell_templates() -> dict[tuple, tuple]:
    """Pixels of every (background, shape, colour, jitter) a cell can hold -> (shape, colour)."""
    templates = {}
    for style in S.STYLES.values():
        for kind in S.SHAPES:
            for colour in S.COLOURS:
                for dx in (-1, 0, 1):
                    for dy in (-1, 0, 1):
                        png = S.draw([S.Shape(kind, colour, 0, 0)], style.background, [(dx, dy)])
                        image = Image.open(io.BytesIO(png)).crop((0, 0, S.CELL, S.CELL))
                        templates[image.tobytes()] = (kind, colour)
    return templates


def test_every_answer_follows_from_the_pixels(tiny_shapes):
    """Parse each image back into shapes (exact template match per cell) and recompute every answer."""
    templates = _cell_templates()
    answer_from = {
        "count": lambda shapes, q: S.NUMBERS[len(shapes)],
        "colour": lambda shapes, q: next(c for (cell, (k, c)) in shapes.items() if S.CELLS[cell] in q),
        "pope": lambda shapes, q: "yes" if any(S.CELLS[cell] in q for cell in shapes) else "no",
        "position_lr": lambda shapes, q: ("left", "right")[next(cell for cell, (k, c) in shapes.items() if f" {c} " in q)[1]],
        "position_tb": lambda shapes, q: ("top", "bottom")[next(cell for cell, (k, c) in shapes.items() if f" {c} " in q)[0]],
    }
    for domain, info in S.DOMAINS.items():
        background = S.STYLES[info.style].background
        for split in S.SPLITS:
            for rec in read_llava_records(tiny_shapes / domain / f"{split}.jsonl"):
                image = Image.open(tiny_shapes / rec["image"]).convert("RGB")
                assert image.size == (32, 32) and image.getpixel((0, 0)) == background
                shapes = {}
                for cell in S.CELLS:
                    crop = image.crop((cell[1] * S.CELL, cell[0] * S.CELL, (cell[1] + 1) * S.CELL, (cell[0] + 1) * S.CELL))
                    if set(crop.getdata()) != {background}:
                        shapes[cell] = templates[crop.tobytes()]
                question = rec["conversations"][0]["value"]
                assert answer_from[domain](shapes, question) == rec["conversations"][1]["value"], rec["id"]


def _shipped_records() -> dict[tuple[str, str], list[dict]]:
    return {(d, s): read_llava_records(SHIPPED_DATA / d / f"{s}.jsonl") for d in S.DOMAINS for s in S.SPLITS}


def test_shipped_data_sizes_balance_and_budget():
    records = _shipped_records()
    for (domain, split), rows in records.items():
        assert len(rows) == SPLIT_SIZES[split], (domain, split)
        answers = Counter(r["conversations"][1]["value"] for r in rows)
        assert set(answers) <= set(S.DOMAINS[domain].answers)
        if domain == "pope":
            assert answers["yes"] == answers["no"]  # balanced, as POPE
    ids = [r["id"] for rows in records.values() for r in rows]
    assert len(ids) == len(set(ids))
    images = {r["image"] for rows in records.values() for r in rows}
    assert all((SHIPPED_DATA / image).is_file() for image in images)
    on_disk = [p for p in SHIPPED_DATA.rglob("*") if p.is_file()]
    assert {str(p.relative_to(SHIPPED_DATA)) for p in on_disk if p.suffix == ".png"} == images  # no stale files
    assert sum(p.stat().st_size for p in on_disk) < 20e6


def test_shipped_tokenizer_covers_the_data_and_round_trips_every_answer(tokenizer):
    texts = {turn["value"] for rows in _shipped_records().values() for r in rows for turn in r["conversations"]}
    answers = {r["conversations"][1]["value"] for rows in _shipped_records().values() for r in rows}
    for text in texts:
        assert tokenizer.unk_token_id not in tokenizer(text, add_special_tokens=False)["input_ids"], text
    for answer in answers:
        assert tokenizer.decode(tokenizer(answer, add_special_tokens=False)["input_ids"]) == answer
    # generation stops at the end-of-turn token the template closes each answer with
    assert tokenizer.eos_token == S.END_OF_TURN and tokenizer.pad_token == "<pad>" and tokenizer.bos_token == "<s>"
    config = json.loads((SHIPPED_TOKENIZER / "tokenizer_config.json").read_text())
    assert config["eos_token"] == S.END_OF_TURN


def test_shipped_data_is_what_the_generator_writes(tmp_path):
    S.main(["--out", str(tmp_path / "shapes")])
    for ours, shipped in ((tmp_path / "shapes", SHIPPED_DATA), (tmp_path / "tokenizer", SHIPPED_TOKENIZER)):
        comparison = filecmp.dircmp(ours, shipped)
        assert _files(ours) == _files(shipped), comparison.report_full_closure()

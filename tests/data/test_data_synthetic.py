"""The synthetic shapes generator and the shipped data: deterministic, correct answers, held-out splits that
share no item with training, difficulty knobs that do what they say, within budget, and exactly representable
by the shipped tokenizer."""

import filecmp
import functools
import hashlib
import json
import random
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
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


# a non-default difficulty: every knob that keeps images parseable by exact template match moved
HARD = S.ShapesDifficulty(conventions=4, distractors=2, jitter=1, min_size=8, max_shapes=3, cooccurrence=0.8)
# what each domain's answer is, given the parsed image ({cell: (kind, colour)}) and the question
MIRRORED = {"position_lr": (1, ("left", "right")), "position_tb": (0, ("top", "bottom")),
            "position_rl": (1, ("right", "left")), "position_bt": (0, ("bottom", "top"))}


def _asked_cell(shapes: dict, question: str) -> tuple[int, int]:
    (cell,) = [cell for cell, (kind, colour) in shapes.items() if f" {colour} " in question]
    return cell


ANSWER_FROM = {
    "count": lambda shapes, q: S.NUMBERS[len(shapes)],
    "colour": lambda shapes, q: next(c for (cell, (k, c)) in shapes.items() if S.CELLS[cell] in q),
    "pope": lambda shapes, q: "yes" if any(S.CELLS[cell] in q for cell in shapes) else "no",
    **{domain: lambda shapes, q, axis=axis, words=words: words[_asked_cell(shapes, q)[axis]]
       for domain, (axis, words) in MIRRORED.items()},
    "pope_cooccur": lambda shapes, q: "yes" if any(kind == "circle" for kind, _ in shapes.values()) else "no",
}


@pytest.fixture(scope="module")
def hard_shapes(tmp_path_factory) -> Path:
    return S.generate_shapes(tmp_path_factory.mktemp("hard"), HARD, seed=3, n_train=40, n_eval=12)


@functools.cache
def _cell_templates() -> dict[bytes, tuple[str, str]]:
    """Pixels of every (background, shape, colour, size, shift) a cell can hold -> (shape, colour)."""
    templates = {}
    for background in {style.background for style in S.STYLES.values()}:
        for kind in S.SHAPES:
            for colour in S.COLOURS:
                for size in range(HARD.min_size, S.MAX_SIZE + 1):
                    for dx in (-2, -1, 0, 1, 2):
                        for dy in (-2, -1, 0, 1, 2):
                            image = S.render([S.Shape(kind, colour, 0, 0, dx, dy, size)], background)
                            templates[image.crop((0, 0, S.CELL, S.CELL)).tobytes()] = (kind, colour)
    return templates


def _parse(image: Image.Image, background, templates) -> dict[tuple[int, int], tuple[str, str]]:
    """The image's shapes, {cell: (kind, colour)}, by exact template match of each non-empty cell."""
    shapes = {}
    for cell in S.CELLS:
        crop = image.crop((cell[1] * S.CELL, cell[0] * S.CELL, (cell[1] + 1) * S.CELL, (cell[0] + 1) * S.CELL))
        if set(crop.getdata()) != {background}:
            shapes[cell] = templates[crop.tobytes()]
    return shapes


@pytest.mark.parametrize("which", ["tiny_shapes", "hard_shapes"])
def test_every_answer_follows_from_the_pixels(which, request):
    """Parse each image back into shapes (exact template match per cell) and recompute every answer."""
    root, difficulty = request.getfixturevalue(which), S.ShapesDifficulty() if which == "tiny_shapes" else HARD
    templates = _cell_templates()
    for domain in difficulty.domains():
        background = S.STYLES[S.DOMAINS[domain].style].background
        for split in S.SPLITS:
            for rec in read_llava_records(root / domain / f"{split}.jsonl"):
                image = Image.open(root / rec["image"]).convert("RGB")
                assert image.size == (32, 32)
                assert Counter(image.getdata()).most_common(1)[0][0] == background
                shapes = _parse(image, background, templates)
                question = rec["conversations"][0]["value"]
                assert ANSWER_FROM[domain](shapes, question) == rec["conversations"][1]["value"], rec["id"]
                if domain.startswith("position"):
                    assert len(shapes) == 1 + difficulty.distractors, rec["id"]
                if domain == "count":
                    assert len(shapes) <= difficulty.max_shapes
                if domain == "pope_cooccur" and split == "test" and rec["conversations"][1]["value"] == "no":
                    assert "square" in {kind for kind, _ in shapes.values()}, rec["id"]  # the co-occurrence bait


def _item_keys(root: Path, domain: str, split: str) -> tuple[set[str], set[tuple[str, str]]]:
    """(digests of the split's image bytes, (image digest, question) of each record)."""
    items = {(hashlib.sha256((root / r["image"]).read_bytes()).hexdigest(), r["conversations"][0]["value"])
             for r in read_llava_records(root / domain / f"{split}.jsonl")}
    return {image for image, _ in items}, items


def _assert_held_out(root: Path, domains) -> None:
    for domain in domains:
        keys = {split: _item_keys(root, domain, split) for split in S.SPLITS}
        for held, earlier in (("val", "train"), ("test", "train"), ("test", "val")):
            assert not keys[held][1] & keys[earlier][1], (domain, held, earlier)  # image bytes + question
            assert not keys[held][0] & keys[earlier][0], (domain, held, earlier)  # image bytes alone


def test_shipped_held_out_items_are_not_training_items():
    _assert_held_out(SHIPPED_DATA, S.SHIPPED_DOMAINS)


def test_generated_held_out_items_are_not_training_items(hard_shapes):
    _assert_held_out(hard_shapes, HARD.domains())


SMALL = S.ShapesDifficulty(conventions=1, jitter=0, min_size=12)  # 64 distinct one-shape position images


def test_held_out_images_are_drawn_again_where_the_image_space_is_small(tmp_path):
    """With 64 position images, 100 train draws hold most of them: held-out items only avoid them by redrawing."""
    S.generate(tmp_path / "small", n_train=100, n_eval=10, difficulty=SMALL)
    train = _item_keys(tmp_path / "small", "position_lr", "train")[0]
    assert len(train) > 40
    _assert_held_out(tmp_path / "small", SMALL.domains())
    with pytest.raises(ValueError, match="shapes val images of style .* too small for disjoint splits"):
        S.generate(tmp_path / "full", n_train=1000, n_eval=10, difficulty=SMALL)  # train holds every one-shape image


def test_draw_new_redraws_until_new_and_names_an_exhausted_space():
    rng = random.Random(0)
    earlier = {S.digest(b"a"), S.digest(b"b")}
    data, payload = S.draw_new(lambda: (x := rng.choice([b"a", b"b", b"c"]), x.decode()), earlier, "letters")
    assert (data, payload) == (b"c", "c")
    with pytest.raises(ValueError, match="letters: .* too small"):
        S.draw_new(lambda: (b"a", None), earlier, "letters")


# ----- difficulty knobs -------------------------------------------------------------------------


def _ink_box(image: Image.Image, background) -> tuple[int, int, int, int]:
    ink = np.argwhere((np.asarray(image) != background).any(-1))
    (y0, x0), (y1, x1) = ink.min(0), ink.max(0)
    return x0, y0, x1, y1


def test_jitter_and_size_move_and_scale_the_shape_within_its_cell():
    white = S.STYLES["white"].background
    for d in (S.ShapesDifficulty(jitter=0, min_size=12), S.ShapesDifficulty(), S.ShapesDifficulty(min_size=6)):
        rng = random.Random(1)
        shapes = [S.place(rng, d, "circle", "red", (1, 1)) for _ in range(400)]
        assert {s.dx for s in shapes} == {s.dy for s in shapes} == set(range(-d.jitter, d.jitter + 1))
        assert {s.size for s in shapes} == set(range(d.min_size, S.MAX_SIZE + 1))
        for shape in shapes[:50]:
            x0, y0, x1, y1 = _ink_box(S.render([shape], white), white)
            assert x1 - x0 + 1 == y1 - y0 + 1 == shape.size  # a circle fills its box
            assert S.CELL <= x0 and x1 < 2 * S.CELL and S.CELL <= y0 and y1 < 2 * S.CELL  # inside its cell
    base = _ink_box(S.render([S.Shape("square", "blue", 0, 1)], white), white)
    moved = _ink_box(S.render([S.Shape("square", "blue", 0, 1, dx=2, dy=-1)], white), white)
    assert np.subtract(moved, base).tolist() == [2, -1, 2, -1]


def test_colour_and_pixel_noise_stay_within_their_bounds(tmp_path):
    d = S.ShapesDifficulty(colour_noise=30, pixel_noise=8)
    root = S.generate_shapes(tmp_path, d, n_train=8, n_eval=4)
    palette = np.array(list(S.COLOURS.values()))
    for rec in read_llava_records(root / "colour" / "test.jsonl"):
        pixels = np.asarray(Image.open(root / rec["image"]).convert("RGB")).astype(int)
        background = np.abs(pixels - 255).max(-1) <= d.pixel_noise  # white, up to the pixel noise
        assert 0 < np.abs(pixels[background] - 255).max() <= d.pixel_noise
        cell = next(c for c, name in S.CELLS.items() if name in rec["conversations"][0]["value"])
        patch = pixels[cell[0] * 16:(cell[0] + 1) * 16, cell[1] * 16:(cell[1] + 1) * 16]
        ink = patch[np.abs(patch - 255).max(-1) > 60]  # away from white by more than both noises
        nearest = np.abs(ink[:, None, :] - palette[None]).max(-1).argmin(-1)
        assert list(S.COLOURS)[np.bincount(nearest).argmax()] == rec["conversations"][1]["value"]
        deviation = np.abs(ink - palette[np.bincount(nearest).argmax()]).max()
        assert deviation <= d.colour_noise + d.pixel_noise


def test_cooccurrence_biases_train_and_baits_test():
    d, asked, companion = S.ShapesDifficulty(cooccurrence=0.8), *S.COOCCUR_PAIR
    rng = random.Random(2)

    def kinds(split, answer):
        return [{s.kind for s in S.cooccur_image(rng, d, split, answer)[0]} for _ in range(1000)]

    train_yes, train_no, test_no = kinds("train", "yes"), kinds("train", "no"), kinds("test", "no")
    assert all(asked in k for k in train_yes) and not any(asked in k for k in train_no + test_no)
    assert 0.75 < np.mean([companion in k for k in train_yes]) < 0.85  # 0.8, 4 standard errors either side
    assert 0.15 < np.mean([companion in k for k in train_no]) < 0.25
    assert all(companion in k for k in test_no)
    sizes = {answer: Counter(len(S.cooccur_image(rng, d, "train", answer)[0]) for _ in range(1000))
             for answer in ("yes", "no")}
    assert set(sizes["yes"]) == set(sizes["no"]) == {2, 3}  # the number of shapes does not give the answer away


def test_max_shapes_and_conventions_set_the_answers_and_domains():
    assert S.ShapesDifficulty().domains() == ("count", "colour", "pope", "position_lr", "position_tb")
    assert S.ShapesDifficulty(conventions=1).domains()[-1] == "position_lr"
    assert S.ShapesDifficulty(conventions=3, cooccurrence=0.9).domains()[-2:] == ("position_rl", "pope_cooccur")
    rng = random.Random(0)
    plans = S.image_plans(S.ShapesDifficulty(max_shapes=2), "train", 40)
    counts = {maker(rng)[1]["count"][1] for maker in plans["white"](rng)}
    assert counts == {"one", "two"}


@pytest.mark.parametrize("field, value", [("conventions", 5), ("distractors", -1), ("jitter", 3), ("min_size", 13),
                                          ("colour_noise", 61), ("pixel_noise", 1.5), ("max_shapes", 0),
                                          ("cooccurrence", 0.2), ("jitter", True)])
def test_a_difficulty_out_of_range_names_its_field(field, value):
    with pytest.raises(ValueError, match=f"ShapesDifficulty.{field} must be"):
        S.ShapesDifficulty(**{field: value})


def test_generate_shapes_is_deterministic_and_cached_by_its_settings(tmp_path):
    a = S.generate_shapes(tmp_path / "a", HARD, seed=1, n_train=6, n_eval=2)
    b = S.generate_shapes(tmp_path / "b", HARD, seed=1, n_train=6, n_eval=2)
    assert a.name == b.name and _files(a) == _files(b)
    assert json.loads((a / S.SETTINGS_FILE).read_text())["difficulty"] == asdict(HARD)
    (a / "count" / "train.jsonl").write_text("")  # a cached set is reused, not rewritten
    assert S.generate_shapes(tmp_path / "a", HARD, seed=1, n_train=6, n_eval=2) == a
    assert (a / "count" / "train.jsonl").read_text() == ""
    other = S.generate_shapes(tmp_path / "a", HARD, seed=2, n_train=6, n_eval=2)
    assert other != a and _files(other) != _files(b)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted([a.name, other.name])  # no scratch left
    (other / S.SETTINGS_FILE).write_text("{}")
    with pytest.raises(ValueError, match="does not hold the set of these settings"):
        S.generate_shapes(tmp_path / "a", HARD, seed=2, n_train=6, n_eval=2)


def _shipped_records() -> dict[tuple[str, str], list[dict]]:
    return {(d, s): read_llava_records(SHIPPED_DATA / d / f"{s}.jsonl") for d in S.SHIPPED_DOMAINS for s in S.SPLITS}


def test_shipped_data_sizes_balance_and_budget():
    records = _shipped_records()
    for (domain, split), rows in records.items():
        assert len(rows) == SPLIT_SIZES[split], (domain, split)
        answers = Counter(r["conversations"][1]["value"] for r in rows)
        assert set(answers) <= set(S.DOMAINS[domain].answers)
        assert max(answers.values()) - min(answers.values()) <= 1, (domain, split, answers)  # exactly balanced
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

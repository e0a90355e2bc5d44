"""The synthetic audio / video / cross-modal generator and the shipped `data/media`: deterministic, every
answer recomputed from the signal, held-out pools, within the size budget, covered by the shipped
tokenizer without moving the shapes' token ids, and loadable by the DataModule."""

import functools
import hashlib
import io
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image

from lightning_moe.data import DomainMixtureDataModule, read_llava_records
from lightning_moe.data import synthetic as S
from lightning_moe.data import synthetic_media as M
from lightning_moe.modalities.audio import read_audio
from lightning_moe.modalities import frame_files
from lightning_moe.paths import REPO_ROOT
from tests.data.data_helpers import SHIPPED_TOKENIZER

MEDIA_TOKENIZER = SHIPPED_TOKENIZER.parent / "media_tokenizer"

SHIPPED_MEDIA = REPO_ROOT / "data" / "media"
SPLIT_SIZES = {"train": 2000, "val": 200, "test": 200}
TINY_POOLS = {"train": 8, "val": 4, "test": 4}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _records() -> dict[tuple[str, str], list[dict]]:
    return {(d, s): read_llava_records(SHIPPED_MEDIA / d / f"{s}.jsonl") for d in M.DOMAINS for s in S.SPLITS}


def test_generator_is_deterministic(tmp_path):
    for run in ("a", "b"):
        M.generate(tmp_path / run / "media", n_train=12, n_eval=4, pools=TINY_POOLS)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a == b
    assert {"media/beeps/train.jsonl", "media/motion/test.jsonl", "media/README.md", "media/audio/pitch/val/000.flac",
            "media/videos/frames/train/000/3.png"} <= set(a)


def test_shipped_media_is_what_the_generator_writes(tmp_path):
    M.main(["--out", str(tmp_path / "media")])
    for ours, shipped in ((tmp_path / "media", SHIPPED_MEDIA), (tmp_path / "media_tokenizer", MEDIA_TOKENIZER)):
        assert _files(ours) == _files(shipped), ours


# ----- every answer follows from the signal ---------------------------------------------------------


def _active_runs(file: Path) -> list[int]:
    """Lengths (in 10 ms frames) of the stretches where the clip is sounding."""
    audio = read_audio(file)
    rms = np.sqrt((audio[: len(audio) // 160 * 160].reshape(-1, 160) ** 2).mean(1))
    active = np.concatenate([[0], (rms > 0.05).astype(int), [0]])
    starts, ends = np.flatnonzero(np.diff(active) == 1), np.flatnonzero(np.diff(active) == -1)
    return (ends - starts).tolist()


def _peak_hz(file: Path) -> float:
    audio = read_audio(file)
    spectrum = np.abs(np.fft.rfft(audio))
    return float(np.fft.rfftfreq(len(audio), 1 / 16_000)[spectrum.argmax()])


def _non_white(file: Path) -> np.ndarray:
    return (np.asarray(Image.open(file).convert("RGB")) != 255).any(-1)  # (32, 32) bool


def _shapes_in_image(file: Path) -> int:
    ink = _non_white(file)
    return sum(bool(ink[r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16].any()) for r in (0, 1) for c in (0, 1))


def _direction(frames: list[Path]) -> str:
    xs = [np.flatnonzero(_non_white(f).any(0)).mean() for f in frames]
    assert all(np.diff(xs) > 0) or all(np.diff(xs) < 0), xs
    return "right" if xs[-1] > xs[0] else "left"


def test_every_shipped_answer_follows_from_the_signal():
    runs = functools.lru_cache(maxsize=None)(_active_runs)
    answer_from = {
        "beeps": lambda r: S.NUMBERS[len(runs(SHIPPED_MEDIA / r["audio"]))],
        "pitch": lambda r: "high" if _peak_hz(SHIPPED_MEDIA / r["audio"]) > 1000 else "low",
        "longer": lambda r: ("first", "second")[int(np.argmax(runs(SHIPPED_MEDIA / r["audio"])))],
        "frames": lambda r: S.NUMBERS[sum(_non_white(f).any() for f in frame_files(SHIPPED_MEDIA / r["video"]))],
        "motion": lambda r: _direction([SHIPPED_MEDIA / f for f in r["video"]]),
        "beeps_shapes": lambda r: ("no", "yes")[
            len(runs(SHIPPED_MEDIA / r["audio"])) == _shapes_in_image(SHIPPED_MEDIA / r["image"])],
    }
    checked = Counter()
    for (domain, split), rows in _records().items():
        seen = set()
        for r in rows:
            key = json.dumps({k: r[k] for k in ("image", "audio", "video") if k in r}) + r["conversations"][1]["value"]
            if key in seen:  # items are reused by many records: check each (item, answer) once
                continue
            seen.add(key)
            assert answer_from[domain](r) == r["conversations"][1]["value"], r["id"]
            checked[domain] += 1
    assert all(checked[d] >= 16 for d in M.DOMAINS), checked


# ----- sizes, balance, held-out pools, budget --------------------------------------------------------


def _items(rows: list[dict]) -> set[str]:
    out = set()
    for r in rows:
        for k in ("image", "audio"):
            if k in r:
                out.add(r[k])
        if isinstance(r.get("video"), str):
            out.add(r["video"])
    return out


def test_shipped_media_sizes_balance_held_out_pools_and_budget():
    records = _records()
    for (domain, split), rows in records.items():
        assert len(rows) == SPLIT_SIZES[split], (domain, split)
        answers = Counter(r["conversations"][1]["value"] for r in rows)
        assert set(answers) == set(M.DOMAINS[domain].answers)
        assert max(answers.values()) - min(answers.values()) <= 1, (domain, split, answers)  # exactly balanced
    ids = [r["id"] for rows in records.values() for r in rows]
    assert len(ids) == len(set(ids))
    for domain in M.DOMAINS:
        train = _items(records[(domain, "train")])
        for split in ("val", "test"):
            assert not train & _items(records[(domain, split)]), (domain, split)  # held-out clips, images, videos
    combos = {s: {tuple(Path(r["video"][0]).stem.split("_")[:3]) for r in records[("motion", s)]} for s in S.SPLITS}
    assert not combos["train"] & combos["test"] and not combos["train"] & combos["val"]
    for r in records[("motion", "test")]:
        assert len(r["video"]) == M.N_FRAMES and len(set(r["video"])) == M.N_FRAMES
    files = [p for p in SHIPPED_MEDIA.rglob("*") if p.is_file()]
    referenced = {f for rows in records.values() for r in rows
                  for f in ([r["video"]] if isinstance(r.get("video"), str) else r.get("video", []))}
    referenced |= {r[k] for rows in records.values() for r in rows for k in ("image", "audio") if k in r}
    on_disk = {str(p.relative_to(SHIPPED_MEDIA)) for p in files if p.suffix in (".flac", ".png")}
    frame_dirs = {str(p.parent.relative_to(SHIPPED_MEDIA)) for p in files if "videos/frames" in str(p)}
    assert on_disk - referenced == {f for f in on_disk if str(Path(f).parent) in frame_dirs}  # no stale files
    assert frame_dirs <= referenced
    assert sum(p.stat().st_size for p in files) < 15e6


def _item_bytes(record: dict) -> bytes:
    """Every byte of the record's clip, image and video frames, in order."""
    files = [record[k] for k in ("image", "audio") if k in record]
    video = record.get("video", [])
    files += [str(f.relative_to(SHIPPED_MEDIA)) for f in frame_files(SHIPPED_MEDIA / video)] if isinstance(video, str) \
        else video
    return b"".join((SHIPPED_MEDIA / f).read_bytes() for f in files)


def test_shipped_held_out_items_are_not_training_items():
    """By content, not by file name: no val or test record's media bytes are a train record's (the question is
    one per domain), and no test record's a val record's."""
    records = _records()
    for domain in M.DOMAINS:
        items = {s: {hashlib.sha256(_item_bytes(r)).hexdigest() for r in records[(domain, s)]} for s in S.SPLITS}
        for held, earlier in (("val", "train"), ("test", "train"), ("test", "val")):
            assert not items[held] & items[earlier], (domain, held, earlier)


def test_held_out_pool_items_are_drawn_again_where_they_repeat_train(tmp_path, monkeypatch):
    """With beeps clips of 12 possible pitches and fixed offsets, 4 train clips per count leave held-out draws
    a one in three chance of repeating one each: they avoid train's (and test val's) only by redrawing."""
    pitches = [800.0 + 25 * i for i in range(12)]
    monkeypatch.setattr(M, "beeps_clip", lambda rng, count: [(0.25 * s + 0.02, rng.choice(pitches), 0.1)
                                                             for s in range(count)])
    data = M.generate(tmp_path / "media", n_train=16, n_eval=8, pools={"train": 16, "val": 8, "test": 8})
    beeps = {s: {(tmp_path / "media" / r["audio"]).read_bytes() for r in data[s]["beeps"]} for s in S.SPLITS}
    assert len(beeps["train"]) >= 12 and len(beeps["val"]) == len(beeps["test"]) == 8
    assert not beeps["val"] & beeps["train"] and not beeps["test"] & (beeps["train"] | beeps["val"])


def test_pitch_ratio_sets_the_distance_between_high_and_low_tones():
    rng = random.Random(0)
    for ratio in (1.0, 5.0, 9.5):
        high = [M.pitch_clip(rng, "high", ratio)[0][1] for _ in range(200)]
        low = [M.pitch_clip(rng, "low", ratio)[0][1] for _ in range(200)]
        assert M.LOW_PITCH[0] <= min(low) and max(low) <= M.LOW_PITCH[1]
        assert 400 * ratio <= min(high) and max(high) <= 800 * ratio
        assert min(high) / max(low) >= ratio * 0.999


def test_audio_noise_is_white_noise_of_the_given_level():
    rng = random.Random(0)
    silence = np.zeros(M.RATE)
    for noise in (0.0, 0.05):
        samples, _ = soundfile.read(io.BytesIO(M.flac(silence, rng, noise)))
        assert abs(samples.std() - noise) < 0.002  # 16000 samples: the estimate is within 1 %, plus 16-bit steps
    with pytest.raises(ValueError, match="MediaDifficulty.audio_noise must be"):
        M.MediaDifficulty(audio_noise=-0.1)
    with pytest.raises(ValueError, match="MediaDifficulty.pitch_ratio must be"):
        M.MediaDifficulty(pitch_ratio=12)


def test_generate_media_is_deterministic_and_cached_by_its_settings(tmp_path):
    hard = M.MediaDifficulty(pitch_ratio=1.5, audio_noise=0.02)
    a = M.generate_media(tmp_path / "a", hard, n_train=8, n_eval=4, pools=TINY_POOLS)
    b = M.generate_media(tmp_path / "b", hard, n_train=8, n_eval=4, pools=TINY_POOLS)
    assert a.name == b.name and _files(a) == _files(b)
    assert M.generate_media(tmp_path / "a", hard, n_train=8, n_eval=4, pools=TINY_POOLS) == a
    assert M.generate_media(tmp_path / "a", n_train=8, n_eval=4, pools=TINY_POOLS) != a
    highs = [r for r in read_llava_records(a / "pitch" / "train.jsonl") if r["conversations"][1]["value"] == "high"]
    assert all(600 <= _peak_hz(a / r["audio"]) <= 1200 for r in highs)  # 1.5 x the 400 Hz top of the low tones


def test_media_tokenizer_covers_media_and_keeps_the_shapes_token_ids():
    from lightning_moe.tokens import load_tokenizer

    tokenizer = load_tokenizer(MEDIA_TOKENIZER)
    rows = [r for rs in _records().values() for r in rs]
    for text in {t["value"] for r in rows for t in r["conversations"]}:
        assert tokenizer.unk_token_id not in tokenizer(text, add_special_tokens=False)["input_ids"], text
    for answer in {r["conversations"][1]["value"] for r in rows}:
        assert tokenizer.decode(tokenizer(answer, add_special_tokens=False)["input_ids"]) == answer
    # the oracle: the shapes-only vocabulary as it was built before the media words existed
    normalize = lambda text: [w for w, _ in S.pre_tokenizers.Whitespace().pre_tokenize_str(text.lower())]  # noqa: E731
    shapes_words = sorted({w for text in S.vocabulary_texts() for w in normalize(text)})
    before = {token: i for i, token in enumerate([*S.SPECIAL_TOKENS, *shapes_words])}
    vocab = tokenizer.get_vocab()
    assert all(vocab[token] == i for token, i in before.items())
    assert min(vocab[w] for text in M.vocabulary_texts() for w in normalize(text) if w not in before) == len(before)


def test_shipped_media_goes_through_the_datamodule(tokenizer):
    dm = DomainMixtureDataModule(root=str(SHIPPED_MEDIA), tokenizer=str(MEDIA_TOKENIZER), eval_batch_size=8,
                                 audio_chunk_seconds=1.0, audio_max_chunks=2, video_num_frames=4,
                                 max_eval_samples_per_domain=8)
    assert list(dm.domains) == sorted(M.DOMAINS)  # discovered: one folder per domain
    dm.setup("validate")
    for name, loader in zip(dm.eval_domains("validate"), dm.val_dataloader()):
        assert dm.data_report["val"][name]["skipped"] == {} and dm.data_report["val"][name]["long_audio"] == 0
        batch = next(iter(loader))
        for modality in M.DOMAINS[name].modalities:
            assert batch[f"{modality}_counts"].tolist() == [1] * 8, name
        if "audio" in M.DOMAINS[name].modalities:
            assert batch["audio_values"].shape == (8, 2, 80, 100)
            assert batch["audio_chunk_mask"].tolist() == [[True, False]] * 8  # 1 s clips fill one 1 s window
        if "video" in M.DOMAINS[name].modalities:
            assert batch["video_values"].shape == (8, 4, 3, 32, 32) and batch["video_frame_mask"].all()

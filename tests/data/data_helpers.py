"""Helpers of the data tests: write LLaVA records (good or deliberately bad), images, audio and video frames into a temporary root."""

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import soundfile
from PIL import Image

from lightning_moe.paths import REPO_ROOT

SHIPPED_TOKENIZER = REPO_ROOT / "data" / "tokenizer"
SHIPPED_DATA = REPO_ROOT / "data" / "shapes"


def record(rid: str, question: str = "How many shapes are there?", answer: str = "two", images=("img.png",)) -> dict:
    """A single-turn LLaVA record with one <image> placeholder per image."""
    rec = {
        "id": rid,
        "conversations": [
            {"from": "human", "value": "<image>\n" * len(images) + question},
            {"from": "gpt", "value": answer},
        ],
    }
    if images:
        rec["image"] = list(images) if len(images) > 1 else images[0]
    return rec


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows are dicts (dumped as JSON) or raw strings (written as they are: malformed lines)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def write_image(path: Path, colour=(200, 0, 0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), colour).save(path)
    return path


def write_truncated_jpeg(path: Path) -> Path:
    """A JPEG cut at two thirds: PIL's `verify()` accepts it, decoding it fails ("image file is truncated")."""
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = Image.effect_noise((64, 64), 50).convert("RGB")  # noise: the pixel data is most of the file
    buffer = io.BytesIO()
    noise.save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    path.write_bytes(data[: len(data) * 2 // 3])
    return path


def write_broken_zlib_png(path: Path) -> Path:
    """A PNG whose compressed pixel stream is corrupt but whose chunk checksums are right, so `verify()` passes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buffer, "PNG")
    png = buffer.getvalue()
    start = png.index(b"IDAT")  # chunk: length (4 bytes), type, data, CRC of type + data
    (length,) = struct.unpack(">I", png[start - 4 : start])
    data = bytearray(png[start + 4 : start + 4 + length])
    for k in range(10, 40):
        data[k] ^= 0xFF
    crc = struct.pack(">I", zlib.crc32(b"IDAT" + bytes(data)) & 0xFFFFFFFF)
    path.write_bytes(png[: start + 4] + bytes(data) + crc + png[start + 8 + length :])
    return path


def media_record(rid: str, question: str = "How many beeps are there?", answer: str = "two", **media) -> dict:
    """A single-turn record with one placeholder per item of each modality given (image=, audio=, video= lists)."""
    prefix = "".join(f"<{modality}>\n" * len(items) for modality, items in media.items())
    rec = {"id": rid, "conversations": [{"from": "human", "value": prefix + question}, {"from": "gpt", "value": answer}]}
    for modality, items in media.items():
        if items:
            rec[modality] = list(items) if len(items) > 1 else items[0]
    return rec


def tone(seconds: float, freq: float = 440.0, rate: int = 16_000, amplitude: float = 0.5) -> np.ndarray:
    """A sine wave, float32 (samples,)."""
    t = np.arange(round(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_audio(path: Path, samples: np.ndarray, rate: int = 16_000, fmt: str | None = None) -> Path:
    """Write (samples,) or (samples, channels) with soundfile (format from the suffix unless given)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), samples, rate, format=fmt)
    return path


def write_frames(directory: Path, colours, names=None) -> Path:
    """One 32x32 frame per colour, named `names` (default 0.png, 1.png, ...)."""
    for k, colour in enumerate(colours):
        write_image(directory / (names[k] if names else f"{k}.png"), colour)
    return directory

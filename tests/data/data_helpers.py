"""Helpers of the data tests: write LLaVA records (good or deliberately bad) and images into a temporary root."""

import io
import json
import struct
import zlib
from pathlib import Path

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

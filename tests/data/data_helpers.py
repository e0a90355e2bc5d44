"""Helpers of the data tests: write LLaVA records (good or deliberately bad) and images into a temporary root."""

import json
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

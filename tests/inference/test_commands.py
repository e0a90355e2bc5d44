"""`python -m lightning_moe.inference` commands end to end on a tiny model, and the layering rule."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import lightning_moe.inference
from lightning_moe.inference import ExpertStore, RoutingProfile
from lightning_moe.inference.cli import main
from tests.conftest import ROOT, TOKENIZER


def test_export_profile_plan_generate_commands(sparse_model, tmp_path, capsys):
    sparse_model.save_pretrained(tmp_path / "model")
    store = tmp_path / "store"
    main(["export", "--model", str(tmp_path / "model"), "--out", str(store)])
    float_bytes = ExpertStore(store).expert_memory_bytes
    data = ["--data", str(ROOT / "data/shapes"), "--tokenizer", TOKENIZER, "--max-samples", "2"]
    main(["profile", "--store", str(store), *data])
    profile = RoutingProfile.load(store / "routing_profile.json")
    assert profile.tokens > 0 and len(profile.counts) == 2
    main(["plan", "--store", str(store), *data, "--tolerance", "100"])  # any drop allowed: everything to int2
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["plan"]["tolerance"] == 100 and {e["bits"] for e in manifest["experts"]} == {2}
    capsys.readouterr()
    main(["generate", "--store", str(store), "--prompt", "How many shapes are there?", "--tokenizer", TOKENIZER,
          "--image", str(ROOT / "data/shapes/images/dark/test/00000.png"), "--budget-fraction", "0.5",
          "--policy", "freq_distance", "--prefetch", "--max-new-tokens", "3"])
    err = capsys.readouterr().err
    stats = json.loads(err.strip().splitlines()[-1])
    assert stats["hits"] + stats["misses"] > 0 and stats["peak_expert_bytes"] > 0
    assert ExpertStore(store).expert_memory_bytes < float_bytes / 10  # int2: 1/16 of float32 plus row scales


def test_inference_imports_neither_lightning_nor_methods():
    package = Path(lightning_moe.inference.__file__).parent
    for file in package.glob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                name = f"lightning_moe.{module}" if node.level == 2 else module
            elif isinstance(node, ast.Import):
                name = ",".join(alias.name for alias in node.names)
            else:
                continue
            assert not name.startswith(("lightning.", "lightning_moe.methods")) and name != "lightning", \
                f"{file.name} imports {name}"
            if file.name != "cli.py":  # only the command layer reads datasets
                assert not name.startswith("lightning_moe.data"), f"{file.name} imports {name}"

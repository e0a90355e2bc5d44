"""`python -m lightning_moe.edge` commands end to end on a tiny model."""

from __future__ import annotations

import json
import re

import pytest
import torch

from lightning_moe.edge import main
from lightning_moe.inference import ExpertStore, RoutingProfile
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


def test_generate_on_a_healthy_store_warns_nothing_and_loads_every_stored_tensor(sparse_model, store, recwarn, capsys):
    """Every tensor of base.safetensors is loaded, also the image tower's unused pooling kept as buffers (built on
    the meta device with the parameters, modalities/image.py), which `load_state_dict` skips with a warning each when
    they are left there."""
    from lightning_moe.inference import load_offloaded, load_resident_model

    main(["generate", "--store", str(store.directory), "--prompt", "How many shapes are there?", "--tokenizer",
          TOKENIZER, "--image", str(ROOT / "data/shapes/images/dark/test/00000.png"), "--max-new-tokens", "2"])
    assert json.loads(capsys.readouterr().err.strip().splitlines()[-1])["misses"] > 0  # it generated
    assert not [str(w.message) for w in recwarn], [str(w.message) for w in recwarn]
    expected = sparse_model.state_dict()
    for model in (load_resident_model(store), load_offloaded(store)[0]):
        pooling = {k: v for k, v in model.state_dict().items() if ".post_layernorm." in k}
        assert pooling and not [k for k in pooling if k in dict(model.named_parameters())]  # buffers, not parameters
        for key, value in pooling.items():
            assert torch.equal(value, expected[key]), key
    assert not [str(w.message) for w in recwarn], [str(w.message) for w in recwarn]


def test_generate_names_the_store_and_the_modality_a_model_cannot_read(sparse_model, tmp_path):
    sparse_model.save_pretrained(tmp_path / "model")  # an image-only model
    store = tmp_path / "store"
    main(["export", "--model", str(tmp_path / "model"), "--out", str(store)])
    media = ROOT / "data/media"
    with pytest.raises(SystemExit, match=rf"^{re.escape(str(store))}: the stored model has no audio or video encoder"):
        main(["generate", "--store", str(store), "--prompt", "Which way?", "--tokenizer", TOKENIZER,
              "--audio", str(media / "audio/beeps/test/020.flac"), "--video", str(media / "videos/frames/test/004")])

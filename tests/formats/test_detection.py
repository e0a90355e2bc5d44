"""Which format a path is: each layout, written by the code that writes it (or by its own library), is
detected as its format and by no other format's detector; a path of no format is one error naming it and
every format tried; and the registry is the only dispatch (a format added to it is used)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from lightning_moe import formats
from lightning_moe.formats import (FORMATS, ModelFormat, UnknownFormatError, detect_format, export_llm,
                                   export_multimodal, export_peft, load_backbone)
from lightning_moe.formats.peft import is_peft_directory
from lightning_moe.formats.project import CHECKPOINT_CONFIG_KEY
from lightning_moe.models import AdapterRule, MultimodalLM, add_adapters, build_multimodal, save_adapters
from tests.conftest import TINY_LLM, TOKENIZER, tiny_encoders
from tests.models.test_hf_llava import tiny_original_llava

# layout -> the format that must detect it (None: no model format)
LAYOUTS = {
    "project": "project",
    "model.ckpt": "checkpoint",
    "checkpoint_without_suffix": "checkpoint",
    "llava_hf": "llava-hf",
    "llava_original": "llava-original",
    "hf_causal_lm": "hf-causal-lm",
}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory, tokenizer) -> Path:
    """One tiny model written in every layout (and the adapter layouts beside them)."""
    root = tmp_path_factory.mktemp("layouts")
    model = build_multimodal(tokenizer, "tiny-llama", TINY_LLM, tiny_encoders())
    model.save_pretrained(root / "project")
    checkpoint = {CHECKPOINT_CONFIG_KEY: model.config_dict(),
                  "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}
    torch.save(checkpoint, root / "model.ckpt")
    torch.save(checkpoint, root / "checkpoint_without_suffix")  # a torch zip archive by content
    export_multimodal(model, root / "llava_hf", tokenizer)
    tiny_original_llava(root / "llava_original", Path(TOKENIZER), with_tower=False)  # also writes root/clip
    export_llm(model, root / "hf_causal_lm", tokenizer)
    add_adapters(model, [AdapterRule(kind="lora", targets=["q_proj"], r=2)])
    export_peft(model, root / "peft")
    save_adapters(model, root / "adapters")
    return root


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_is_detected_as_its_format_and_no_other(layouts, layout):
    path = layouts / layout
    assert detect_format(path).name == LAYOUTS[layout]
    assert [f.name for f in FORMATS if f.detect(path)] == [LAYOUTS[layout]]


def test_every_loadable_layout_loads_the_same_model(layouts, tokenizer):
    want = MultimodalLM.from_pretrained(layouts / "project").state_dict()
    for layout in ("model.ckpt", "checkpoint_without_suffix", "llava_hf"):
        got = load_backbone(layouts / layout, tokenizer=tokenizer).state_dict()
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), layout


def test_adapter_directories_are_told_apart_and_are_no_model_format(layouts):
    assert is_peft_directory(layouts / "peft") and not is_peft_directory(layouts / "adapters")
    assert not is_peft_directory(layouts / "project")
    for layout in ("peft", "adapters"):
        with pytest.raises(UnknownFormatError):
            detect_format(layouts / layout)


def test_a_path_no_format_recognises_is_one_error_naming_it_and_every_format(layouts, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not a model")
    for path in (tmp_path / "empty", tmp_path / "notes.txt", layouts / "clip"):  # clip: a vision tower's directory
        with pytest.raises(UnknownFormatError) as error:
            load_backbone(path)
        assert str(path) in str(error.value)
        assert all(f"{f.name}: {f.description}" in str(error.value) for f in FORMATS)
    with pytest.raises(FileNotFoundError, match="missing"):
        detect_format(tmp_path / "missing")


@pytest.mark.parametrize("file, detect", [("config.json", detect_format), ("adapter_config.json", is_peft_directory)])
def test_a_json_config_that_is_not_a_json_object_is_an_error_naming_it(tmp_path, file, detect):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / file).write_text("{not json")
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / file).write_text("[1, 2]")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / 'bad' / file))} is not valid JSON"):
        detect(tmp_path / "bad")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / 'list' / file))} holds a JSON list"):
        detect(tmp_path / "list")


def test_a_transformers_causal_lm_as_backbone_says_where_it_goes(layouts):
    with pytest.raises(ValueError, match="transformers causal LM .*'llama'.*backbone.llm"):
        load_backbone(layouts / "hf_causal_lm")


def test_a_format_added_to_the_registry_is_detected_and_loaded(tmp_path, monkeypatch):
    """What a new format (e.g. TFLite) takes: one `ModelFormat`, one entry in FORMATS; nothing else dispatches."""
    (tmp_path / "model.tflite").write_bytes(b"TFL3" + bytes(12))
    loaded = []

    def load(path: Path, **options) -> str:
        loaded.append((path, options["allow_unsafe"]))
        return "a model"

    tflite = ModelFormat("tflite", "a TFLite file", lambda path: path.is_file() and path.read_bytes()[:4] == b"TFL3", load)
    with pytest.raises(UnknownFormatError, match="model.tflite"):
        detect_format(tmp_path / "model.tflite")
    monkeypatch.setattr(formats, "FORMATS", (*FORMATS, tflite))
    assert detect_format(tmp_path / "model.tflite") is tflite
    assert load_backbone(tmp_path / "model.tflite", allow_unsafe=True) == "a model"
    assert loaded == [(tmp_path / "model.tflite", True)]

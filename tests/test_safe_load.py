"""Loading a file never runs code: a pickle payload is refused before it executes, the project's own
checkpoints still load (also those naming a class by the path it had before it moved), and the opt-in is
explicit."""

from __future__ import annotations

import importlib.util
import os
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch

from lightning_moe.safe_load import RENAMED_CLASSES, UnsafeFileError, check_safe_weights, load_torch_file
from tests.conftest import ROOT

FIXTURE_CKPT = ROOT / "tests/fixtures/pre_restructure/moe_tuning.ckpt"


class MarkerPayload:
    """Unpickling this creates a file: the test's witness that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_payload_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": {"x": MarkerPayload(marker)}}, path)
    return path


def test_pickle_payload_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "marker"
    ckpt = write_payload_checkpoint(tmp_path / "evil.ckpt", marker)
    with pytest.raises(UnsafeFileError) as error:
        load_torch_file(ckpt)
    message = str(error.value)
    assert str(ckpt) in message and "posix.system" in message and "allow_unsafe_checkpoint" in message
    assert not marker.exists()


def test_opt_in_loads_with_full_pickle_and_warns(tmp_path):
    marker = tmp_path / "marker"
    ckpt = write_payload_checkpoint(tmp_path / "trusted.ckpt", marker)
    with pytest.warns(UserWarning, match="runs any code"):
        load_torch_file(ckpt, allow_unsafe=True)
    assert marker.exists()  # the opt-in really is full pickle: that is what it warns about


def test_own_checkpoint_loads_safely_with_its_config_dataclasses():
    checkpoint = load_torch_file(FIXTURE_CKPT)
    assert "multimodal_config" in checkpoint and checkpoint["state_dict"]
    backbone = checkpoint["hyper_parameters"]["backbone"]
    assert type(backbone).__name__ == "BackboneConfig" and backbone.encoders["image"].feature_layer == -1


def resolve(qualified_name: str) -> type:
    module, _, name = qualified_name.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("old, new", sorted(RENAMED_CLASSES.items()))
def test_a_checkpoint_naming_a_class_by_its_old_path_loads(tmp_path, monkeypatch, old, new):
    """Written as the code that still had the old module wrote it; read back on the safe path, by Lightning's own
    `torch.load(weights_only=True)` and with the full-pickle opt-in, without that module ever existing again."""
    import lightning_moe.methods  # noqa: F401  (registers every config class as checkpoint_safe)

    cls = resolve(new)
    old_module, _, old_name = old.rpartition(".")
    monkeypatch.setitem(sys.modules, old_module, types.SimpleNamespace(**{old_name: cls}))
    monkeypatch.setattr(cls, "__module__", old_module)
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": {"config": object.__new__(cls)}},
               tmp_path / "old.ckpt")
    monkeypatch.undo()
    with zipfile.ZipFile(tmp_path / "old.ckpt") as archive:
        pickled = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    assert old_module.encode() in pickled and new.rpartition(".")[0].encode() not in pickled
    assert importlib.util.find_spec(old_module) is None  # no module answers to the old path
    loads = [load_torch_file(tmp_path / "old.ckpt"), torch.load(tmp_path / "old.ckpt", weights_only=True)]
    with pytest.warns(UserWarning, match="runs any code"):
        loads.append(load_torch_file(tmp_path / "old.ckpt", allow_unsafe=True))
    assert all(type(loaded["hyper_parameters"]["config"]) is cls for loaded in loads)
    assert old_module not in sys.modules


@pytest.mark.parametrize("content, expected", [(b"", "empty"), (None, "truncated")])
def test_empty_or_truncated_checkpoint_names_the_file(tmp_path, content, expected):
    path = tmp_path / "bad.ckpt"
    path.write_bytes(FIXTURE_CKPT.read_bytes()[:300] if content is None else content)
    with pytest.raises(ValueError, match=expected) as error:
        load_torch_file(path)
    assert str(path) in str(error.value)


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.ckpt"):
        load_torch_file(tmp_path / "nowhere.ckpt")


def test_directory_with_only_pickle_weights_is_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(UnsafeFileError, match="pytorch_model.bin"):
        check_safe_weights(tmp_path)
    with pytest.warns(UserWarning, match=f"loading {tmp_path} from pickle weights"):  # the opt-in names what it trusts
        check_safe_weights(tmp_path, allow_unsafe=True)
    (tmp_path / "model.safetensors").write_bytes(b"x")
    check_safe_weights(tmp_path)  # safetensors beside it: transformers reads those


def test_trust_remote_code_names_each_model_it_trusts_once_per_run(tmp_path, tokenizer, monkeypatch):
    """One warning per model loaded under the opt-in, naming it; a preset runs no code and is not named."""
    import warnings

    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from lightning_moe.models import build_multimodal

    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(tmp_path / "llm")
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     image_size=32, patch_size=8)).save_pretrained(tmp_path / "tower")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        build_multimodal(tokenizer, str(tmp_path / "llm"), encoders={"image": {"tower": str(tmp_path / "tower")}},
                         trust_remote_code=True)
        build_multimodal(tokenizer, "tiny-llama", encoders={"image": {"tower": "tiny-clip"}}, trust_remote_code=True)
    trusted = [str(w.message) for w in record if "trust_remote_code" in str(w.message)]
    assert trusted == [f"loading LLM {tmp_path / 'llm'} with backbone.trust_remote_code: true: the Python code shipped "
                       "with it (if any) runs; do it only for models you trust",
                       f"loading vision tower {tmp_path / 'tower'} with backbone.trust_remote_code: true: the Python "
                       "code shipped with it (if any) runs; do it only for models you trust"], trusted
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        build_multimodal(tokenizer, str(tmp_path / "llm"), encoders={"image": {"tower": str(tmp_path / "tower")}})
    assert not [w for w in record if "trust_remote_code" in str(w.message)]  # no opt-in, nothing trusted
    # under several processes only the first rank says it (each rank loads the model): rank 1 as torchrun sets it
    monkeypatch.setenv("RANK", "1")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        build_multimodal(tokenizer, str(tmp_path / "llm"), encoders={"image": {"tower": str(tmp_path / "tower")}},
                         trust_remote_code=True)
    assert not [w for w in record if "trust_remote_code" in str(w.message)]


def test_no_unsafe_torch_load_outside_the_opt_in():
    offenders = []
    for path in (ROOT / "lightning_moe").rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "weights_only=False" in line and path.name != "safe_load.py":
                offenders.append(f"{path.relative_to(ROOT)}:{number}")
    assert not offenders, offenders


def test_model_directory_with_a_pickle_payload_is_refused_before_it_runs(tmp_path, tokenizer):
    from lightning_moe.models.multimodal import build_llm

    marker = tmp_path / "marker"
    model_dir = tmp_path / "llm"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1}')
    torch.save({"w": MarkerPayload(marker)}, model_dir / "pytorch_model.bin")
    with pytest.raises(UnsafeFileError, match="pytorch_model.bin") as error:
        build_llm(str(model_dir), tokenizer)
    assert str(model_dir) in str(error.value) and "allow_unsafe_checkpoint" in str(error.value)
    assert not marker.exists()


def test_model_needing_remote_code_fails_without_running_it(tmp_path, tokenizer):
    from lightning_moe.models.multimodal import build_llm

    marker = tmp_path / "marker"
    (tmp_path / "config.json").write_text(
        '{"model_type": "customx", "auto_map": {"AutoConfig": "configuration_x.XConfig", '
        '"AutoModelForCausalLM": "modeling_x.XForCausalLM"}}')
    code = f"open({str(marker)!r}, 'w').write('ran')\n"
    (tmp_path / "configuration_x.py").write_text(code)
    (tmp_path / "modeling_x.py").write_text(code)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UnsafeFileError, match="trust_remote_code"):
        build_llm(str(tmp_path), tokenizer)
    assert not marker.exists()


def test_payload_named_as_backbone_or_teacher_is_refused(tmp_path):
    from lightning_moe.methods import MoDDistillation, MoETuning
    from lightning_moe.methods.base import BackboneConfig
    from tests.conftest import TINY_LLM, TOKENIZER, tiny_encoders

    marker = tmp_path / "marker"
    evil = write_payload_checkpoint(tmp_path / "stage.ckpt", marker)
    with pytest.raises(UnsafeFileError, match="stage.ckpt"):
        MoETuning(stage="moe", tokenizer=TOKENIZER, backbone=BackboneConfig(pretrained=str(evil)))
    tiny = BackboneConfig(llm_overrides=TINY_LLM, encoders=tiny_encoders(-1))
    with pytest.raises(UnsafeFileError, match="stage.ckpt"):
        MoDDistillation(stage="mimic_dense", teacher=str(evil), tokenizer=TOKENIZER, backbone=tiny)
    assert not marker.exists()


def test_written_checkpoint_loads_as_backbone_under_the_safe_path(tmp_path):
    """A checkpoint as `fit` writes it (hyperparameters with config dataclasses) needs no opt-in."""
    from lightning_moe.formats import load_backbone

    expected = load_backbone(FIXTURE_CKPT)
    assert sum(p.numel() for p in expected.parameters()) > 0

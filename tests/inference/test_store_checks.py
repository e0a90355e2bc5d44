"""The store's file checks: the resident weights are verified against the manifest before use, and an
error about a damaged file names every damaged file of the store, each by name."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch
from safetensors.torch import load_file

from lightning_moe.edge import main
from lightning_moe.inference import ExpertStore, StoreError, load_offloaded, load_resident_model
from lightning_moe.inference.store import model_fingerprint, resident_state
from lightning_moe.models import canonical_log
from tests.conftest import TOKENIZER

BASE = "base.safetensors"


def _flip_last_byte(path) -> None:
    # the last byte of a safetensors file is tensor data, so the file keeps its size and still decodes
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _expert_file(store: ExpertStore, layer: int, expert: int):
    return store.directory / store.entries[(layer, expert)].file


def test_export_records_the_resident_files_size_and_checksum(store):
    manifest = json.loads((store.directory / "manifest.json").read_text())
    data = (store.directory / BASE).read_bytes()
    assert manifest["base"] == {"file": BASE, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert store.damaged_files() == {} and store.verify_files() == 1 + 8  # base + 2 layers x 4 experts


def test_flipped_bytes_in_the_resident_weights_are_refused_with_the_files_name(store, sparse_model, capsys):
    path = store.directory / BASE
    _flip_last_byte(path)
    load_file(str(path))  # safetensors reads it without complaint: only the checksum stands in the way
    unchecked = load_resident_model(ExpertStore(store.directory, verify="never"))
    original = resident_state(sparse_model)
    assert any(not torch.equal(t, original[k]) for k, t in resident_state(unchecked).items())  # a wrong model
    with pytest.raises(StoreError, match=r"resident weights \S*/base\.safetensors are corrupted: sha256"):
        load_offloaded(ExpertStore(store.directory))
    with pytest.raises(StoreError, match=r"base\.safetensors are corrupted"):
        load_resident_model(ExpertStore(store.directory))
    with pytest.raises(SystemExit) as exit_:  # the command a user runs: the message, no traceback
        main(["generate", "--store", str(store.directory), "--prompt", "How many shapes?", "--tokenizer", TOKENIZER,
              "--max-new-tokens", "1"])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert re.match(r"generate: resident weights \S*/base\.safetensors are corrupted", err) and "Traceback" not in err


def test_truncated_resident_weights_are_named(store):
    path = store.directory / BASE
    data = path.read_bytes()
    opened = ExpertStore(store.directory)
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match=r"resident weights \S*/base\.safetensors are truncated or altered"):
        load_offloaded(opened)  # cut after the store was opened: caught before use
    with pytest.raises(StoreError, match=r"\S*/base\.safetensors is truncated or altered: \d+ bytes, the manifest"):
        ExpertStore(store.directory)  # opening compares every file's size with the manifest


def test_three_damaged_experts_are_all_named(store):
    damaged = [(0, 1), (1, 0), (1, 3)]
    for key in damaged:
        _flip_last_byte(_expert_file(store, *key))
    names = [store.entries[key].file for key in damaged]
    fresh = ExpertStore(store.directory)  # same sizes: opening passes, the checksums find them
    assert sorted(fresh.damaged_files()) == sorted(names)
    with pytest.raises(StoreError) as err:
        fresh.read(1, 0)
    message = str(err.value)
    assert "layer1_expert0.safetensors is corrupted" in message.splitlines()[0]  # the file this read hit
    assert "has 3 damaged files" in message
    assert all(f"{fresh.directory / name} is corrupted" in message for name in names), message
    assert "layer0_expert0" not in message  # intact files are not listed


def test_damaged_resident_weights_and_experts_are_listed_together(store):
    _flip_last_byte(store.directory / BASE)
    _flip_last_byte(_expert_file(store, 1, 2))
    with pytest.raises(StoreError) as err:
        load_offloaded(ExpertStore(store.directory))
    message = str(err.value)
    assert "has 2 damaged files" in message
    assert f"{store.directory / BASE} is corrupted" in message
    assert "layer1_expert2.safetensors is corrupted" in message


def test_verify_command_lists_every_damaged_file(store, capsys):
    main(["verify", "--store", str(store.directory)])
    assert "all 9 files match the manifest" in capsys.readouterr().out
    _flip_last_byte(store.directory / BASE)
    _flip_last_byte(_expert_file(store, 0, 3))
    (store.directory / store.entries[(1, 1)].file).unlink()
    with pytest.raises(SystemExit) as exit_:
        main(["verify", "--store", str(store.directory)])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "has 3 damaged files" in err and "Traceback" not in err
    assert "layer1_expert1.safetensors is missing" in err  # found by opening the store...
    assert f"{store.directory / BASE} is corrupted" in err and "layer0_expert3.safetensors is corrupted" in err  # ...listed with these
    (store.directory / store.entries[(1, 1)].file).write_bytes(b"")
    with pytest.raises(SystemExit):
        main(["verify", "--store", str(store.directory)])
    assert "layer1_expert1.safetensors is truncated or altered: 0 bytes, the manifest says" in capsys.readouterr().err


def test_a_store_without_the_resident_checksum_is_checked_through_its_fingerprint(store):
    # stores written before the manifest recorded base.safetensors' checksum
    path = store.directory / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["base"], manifest["checksums"]
    path.write_text(json.dumps(manifest))
    load_offloaded(ExpertStore(store.directory))  # intact: the fingerprint covers the same tensors
    _flip_last_byte(store.directory / BASE)
    with pytest.raises(StoreError, match=r"base\.safetensors are corrupted: the fingerprint of its tensors"):
        load_offloaded(ExpertStore(store.directory))
    assert list(ExpertStore(store.directory).damaged_files()) == [BASE]
    (store.directory / BASE).write_bytes((store.directory / BASE).read_bytes()[:100])
    with pytest.raises(StoreError, match=r"base\.safetensors cannot be decoded as safetensors"):
        load_offloaded(ExpertStore(store.directory))


def test_a_store_recording_an_older_surgery_log_matches_the_model_loaded_from_it(store, sparse_model):
    """A store whose manifest records the model's surgery as older code wrote it (Uni-MoE's upcycling logged as
    `modality_experts`) matches the model loaded from that record, whose log now reads `upcycle`; another model
    still does not."""
    manifest_file = store.directory / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    record = manifest["model_config"]["surgery"][0]
    older = {"op": "modality_experts", "experts": ["image", "audio", "video", "dense"], "top_k": record["top_k"],
             "layers": record["layers"], "capacity_factor": record["capacity_factor"],
             "normalize_weights": record["normalize_weights"]}
    assert canonical_log([older]) == [record]  # the two forms are the same surgery
    manifest["model_config"]["surgery"][0] = older
    manifest["fingerprint"] = model_fingerprint(manifest["model_config"], resident_state(sparse_model))
    del manifest["checksums"]  # older code recorded none
    manifest_file.write_text(json.dumps(manifest))
    older_store = ExpertStore(store.directory)
    older_store.check_model(sparse_model)
    with torch.no_grad():
        next(iter(resident_state(sparse_model).values())).add_(1e-3)  # non-expert weights differ
    with pytest.raises(StoreError, match="exported from another model"):
        older_store.check_model(sparse_model)


def _edit_manifest(store: ExpertStore, edit) -> None:
    path = store.directory / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest, indent=1))


def _llm_config_field(manifest: dict, field: str) -> tuple[dict, str]:
    """The dict holding `field` ("a.b": nested) in the manifest's LLM config, and its last key."""
    *parents, key = field.split(".")
    holder = manifest["model_config"]["llm"]
    for parent in parents:
        holder = holder[parent]
    return holder, key


@pytest.mark.parametrize("field, value", [("rope_parameters.rope_theta", 1234.0), ("hidden_act", "gelu")])
def test_an_edited_model_config_fails_verify_and_loading_naming_the_manifest(store, capsys, field, value):
    holder, key = _llm_config_field(json.loads((store.directory / "manifest.json").read_text()), field)
    assert holder[key] != value  # the edit changes the model that loading would build
    _edit_manifest(store, lambda m: _llm_config_field(m, field)[0].__setitem__(key, value))
    with pytest.raises(SystemExit) as exit_:
        main(["verify", "--store", str(store.directory)])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert f"{store.directory / 'manifest.json'} is altered since export: model_config does not match" in err, err
    assert "has 1 damaged file" in err and "Traceback" not in err  # the tensor files are intact
    with pytest.raises(StoreError, match=r"manifest\.json is altered since export: model_config"):
        load_offloaded(store.directory)


def test_an_edited_config_of_a_store_without_manifest_checksums_is_caught_by_the_fingerprint(store):
    _edit_manifest(store, lambda m: m.pop("checksums"))  # as written before the manifest recorded them
    assert ExpertStore(store.directory).verify_files() == 9
    load_resident_model(ExpertStore(store.directory))
    _edit_manifest(store, lambda m: m["model_config"]["llm"].__setitem__("hidden_act", "gelu"))
    opened = ExpertStore(store.directory)  # older stores open (their manifest recorded no checksums)...
    assert list(opened.damaged_files()) == ["manifest.json"]  # ...their fingerprint covers the config
    with pytest.raises(StoreError, match=r"manifest\.json is altered since export: its model_config"):
        load_resident_model(opened)


def _escape_outside(store: ExpertStore, tmp_path, kind: str) -> str:
    """Point expert (0, 1)'s entry at a copy of its file outside the store (same size and sha256)."""
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(_expert_file(store, 0, 1).read_bytes())
    if kind == "symlink":
        link = store.directory / "experts" / "link.safetensors"
        link.symlink_to(outside)
        return "experts/link.safetensors"
    return str(outside) if kind == "absolute" else "../outside.safetensors"


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink"])
def test_an_entry_leaving_the_store_is_refused_and_never_read(store, tmp_path, capsys, monkeypatch, kind):
    file = _escape_outside(store, tmp_path, kind)
    # a consistent manifest (checksums rewritten), as an attacker would write it: the path itself is refused
    store.entries[(0, 1)].file = file
    store.write_manifest()
    opened = []
    real_open = open

    def spying_open(path, *args, **kwargs):
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", spying_open)
    with pytest.raises(SystemExit) as exit_:
        main(["verify", "--store", str(store.directory)])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "refused" in line]
    assert len(lines) == 1 and "the entry of MoE layer 0, expert 1" in lines[0], err
    assert "has 1 damaged file" in err
    assert not any("outside" in p or "link" in p for p in opened), opened
    with pytest.raises(StoreError, match="the entry of MoE layer 0, expert 1"):
        load_offloaded(store.directory)
    assert not any("outside" in p or "link" in p for p in opened), opened


@pytest.mark.parametrize("command", ["generate", "profile", "plan"])
def test_a_command_on_a_damaged_store_says_it_in_one_line_naming_the_first_files(store, capsys, command):
    damaged = [(0, 0), (0, 2), (1, 1), (1, 3)]
    for key in damaged:
        _expert_file(store, *key).unlink()
    names = sorted(store.entries[key].file for key in damaged)
    args = {"generate": ["--prompt", "How many shapes?", "--tokenizer", TOKENIZER],
            "profile": ["--tokenizer", TOKENIZER], "plan": ["--tokenizer", TOKENIZER]}[command]
    with pytest.raises(SystemExit) as exit_:
        main([command, "--store", str(store.directory), *args])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"{command}: store {store.directory} has 4 damaged files: ")
    assert all(f"{name} (missing)" in err for name in names[:3]) and names[3] not in err and "and 1 more" in err
    assert f"verify --store {store.directory}" in err  # where the whole list is


@pytest.mark.parametrize("content", [b"[1, 2]", b'"a store"', b"\xff{}"], ids=["list", "string", "not-utf8"])
def test_a_manifest_that_is_not_a_json_object_is_a_store_error(store, content):
    (store.directory / "manifest.json").write_bytes(content)
    with pytest.raises(StoreError, match=r"manifest\.json (holds a JSON (list|str), not a store manifest|is not valid JSON)"):
        ExpertStore(store.directory)

"""Store and offloader: manifest contents, counters, prefetch hits on a scripted routing sequence,
and every bad input (missing / corrupted / truncated expert file, tiny budget, another model's store)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from lightning_moe.inference import (ExpertOffloader, ExpertStore, RoutingProfile, StoreError, export_store,
                                     load_offloaded, offload)
from lightning_moe.inference.store import expert_layers
from tests.inference.conftest import make_sparse_model


def test_manifest_lists_every_expert_with_bytes_and_checksum(store, sparse_model):
    manifest = json.loads((store.directory / "manifest.json").read_text())
    assert [l["num_experts"] for l in manifest["layers"]] == [4, 4]
    assert len(manifest["experts"]) == 8
    for entry in manifest["experts"]:
        data = (store.directory / entry["file"]).read_bytes()
        assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["dtype"] == "float32" and entry["bits"] == 32
    moe = expert_layers(sparse_model)[1][1]
    assert torch.equal(store.read(1, 2).w_in, moe.w_in[2]) and torch.equal(store.read(1, 2).w_down, moe.down_proj[2])


def test_quantised_store_is_smaller_and_reads_back_within_the_grid(sparse_model, tmp_path):
    full = export_store(sparse_model, tmp_path / "f32")
    int4 = export_store(sparse_model, tmp_path / "int4", bits=4)
    assert int4.expert_memory_bytes < full.expert_memory_bytes / 6  # 1/8 plus per-row scales
    w_in, _ = int4.read(0, 1).dense()
    ref = expert_layers(sparse_model)[0][1].w_in[1]
    step = (ref.amax(1) - ref.amin(1)) / 15
    assert torch.all((w_in - ref).abs() <= step[:, None] / 2 + 1e-6)


def _scripted_profile() -> RoutingProfile:
    # layer 0 -> layer 1: expert e is followed by expert (e + 1) % 4; layer 0's most frequent expert is 3
    transitions = [[0.0] * 4 for _ in range(4)]
    for e in range(4):
        transitions[e][(e + 1) % 4] = 10.0
    return RoutingProfile([4, 4], [[1.0, 2.0, 3.0, 9.0], [1.0, 1.0, 1.0, 1.0]], [[], transitions], 10)


def test_prefetch_hits_are_counted_on_a_scripted_routing_sequence(store):
    budget = 8 * store.largest_expert_bytes  # everything fits: only prediction decides hits
    offloader = ExpertOffloader(store, budget, "lru", _scripted_profile(), prefetch=True, prefetch_width=1)
    script = [(0, [0]), (1, [1]), (0, [3]), (1, [2]), (0, [1]), (1, [0])]
    # (0,[0])  miss; predicts layer 1 expert 1 -> prefetched
    # (1,[1])  hit (prefetched); last layer -> predicts layer 0 by frequency: expert 3 -> prefetched
    # (0,[3])  hit (prefetched); predicts (1, 0) -> prefetched
    # (1,[2])  miss (predicted 0); predicts (0, 3): cached, nothing queued
    # (0,[1])  miss; predicts (1, 2): cached, nothing queued
    # (1,[0])  hit: expert 0 of layer 1 was prefetched two steps ago and not used until now
    for layer, experts in script:
        offloader.expert_stack(layer, experts)
        offloader.wait_prefetches()
    s = offloader.stats
    assert (s.hits, s.misses, s.prefetch_issued, s.prefetch_hits) == (3, 3, 3, 3)
    sizes = {k: e.bytes for k, e in store.entries.items()}
    assert s.bytes_read == sum(sizes[k] for k in [(0, 0), (1, 1), (0, 3), (1, 0), (1, 2), (0, 1)])
    offloader.close()


def test_a_wrong_prediction_falls_back_to_loading_on_demand(store):
    offloader = ExpertOffloader(store, 8 * store.largest_expert_bytes, "lru", _scripted_profile(), prefetch=True,
                                prefetch_width=1)
    w_in, w_down, _, _ = offloader.expert_stack(1, [3, 2])  # nothing predicted for these: two on-demand loads
    assert offloader.stats.misses == 2 and torch.equal(w_in[1], store.read(1, 2).w_in)
    offloader.close()


def test_missing_corrupted_and_truncated_expert_files_are_named(store):
    entry = store.entries[(1, 3)]
    path = store.directory / entry.file
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # same size, one byte flipped
    with pytest.raises(StoreError, match=r"layer1_expert3\.safetensors is corrupted"):
        ExpertStore(store.directory).read(1, 3)
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match=r"layer1_expert3\.safetensors is truncated"):
        ExpertStore(store.directory).read(1, 3)
    path.unlink()
    model, offloader = load_offloaded(ExpertStore(store.directory))
    ids = torch.randint(10, 60, (1, 6))
    with pytest.raises(StoreError, match=r"layer1_expert3\.safetensors is missing"):
        for _ in range(20):  # until routing reaches expert 3 of layer 1
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
            ids = torch.randint(10, 60, (1, 6))


def test_budget_smaller_than_the_largest_expert_is_refused(store):
    with pytest.raises(ValueError, match="smaller than the largest expert"):
        ExpertOffloader(store, store.largest_expert_bytes - 1)


def test_store_from_another_model_is_refused(store, tokenizer):
    other = make_sparse_model(tokenizer, seed=1)  # same architecture, other weights
    with pytest.raises(StoreError, match="exported from another model"):
        offload(other, store)
    wider = make_sparse_model(tokenizer, num_experts=8)  # other architecture
    with pytest.raises(StoreError, match=r"exported from another model: its MoE layers"):
        offload(wider, store)
    assert not any(type(m).__name__ == "OffloadedSparseMoE" for m in other.modules())  # left untouched


def test_dense_cache_and_grouped_prefill_compute_the_quantised_model(sparse_model, tmp_path):
    from lightning_moe.inference.plan import _ExpertWeights

    store = export_store(sparse_model, tmp_path / "int8", bits=8)
    ids = torch.randint(10, 60, (2, 9))
    mask = torch.ones_like(ids)
    weights = _ExpertWeights(sparse_model)
    weights.apply({k: 8 for k in weights.keys})  # the oracle: the resident model with fake-quantised experts
    reference = sparse_model(input_ids=ids, attention_mask=mask).logits
    dense_expert = 4 * sum(p.numel() for p in (expert_layers(sparse_model)[0][1].w_in[0],
                                                expert_layers(sparse_model)[0][1].down_proj[0]))
    budget = 2 * dense_expert
    model, offloader = load_offloaded(ExpertStore(store.directory), budget_bytes=budget, dequantize_on_load=True,
                                      max_working_experts=1)
    logits = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)  # grouped: summation order differs
    assert offloader.cache.peak_bytes <= budget
    assert offloader.stats.peak_expert_bytes <= budget + dense_expert  # + the one-expert working stack
    with pytest.raises(ValueError, match="smaller than the largest expert"):
        ExpertOffloader(ExpertStore(store.directory), dense_expert - 1, dequantize_on_load=True)


def test_predictor_drops_unlikely_guesses():
    from lightning_moe.inference import ExpertPredictor

    confident = ExpertPredictor(_scripted_profile(), width=2, min_probability=0.6)
    assert confident.predict(1, [0]) == [1]  # 10 of ~11 counts: kept; the runner-up has ~0
    assert confident.predict(1, [0, 1]) == []  # experts 1 and 2 share the counts: neither reaches 0.6
    assert ExpertPredictor(_scripted_profile(), width=2).predict(1, [0, 1]) == [1, 2]


def test_offloaded_layers_refuse_to_build_a_graph(sparse_model, store):
    offload(sparse_model, store)
    ids = torch.randint(10, 60, (1, 5))
    with pytest.raises(RuntimeError, match="for inference"):
        sparse_model(input_ids=ids, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        sparse_model(input_ids=ids, attention_mask=torch.ones_like(ids))

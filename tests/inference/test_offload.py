"""Store and offloader: manifest contents, counters, prefetch hits on a scripted routing sequence,
and every bad input (missing / corrupted / truncated expert file, tiny budget, another model's store)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_moe.inference import (ExpertOffloader, ExpertStore, LookaheadPredictor, RoutingProfile, StoreError,
                                     export_store, load_offloaded, offload)
from lightning_moe.inference.store import expert_layers
from lightning_moe.models import MoEConfig, build_multimodal, upcycle
from tests.conftest import TINY_LLM
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
    # guesses scored when their layer runs: (1,{1}) right, (0,{3}) right, (1,{0}) (0,{3}) (1,{2}) wrong
    assert (s.guesses, s.guesses_right) == (5, 2)
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
        ExpertStore(store.directory)  # opening compares every file's size with the manifest
    path.write_bytes(data)
    model, offloader = load_offloaded(ExpertStore(store.directory))
    path.unlink()  # gone after opening: named when first read
    with pytest.raises(StoreError, match=r"layer1_expert3\.safetensors is missing"):
        ExpertStore(store.directory)
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
    # + the one-expert working stack + the buffers kept for reuse (BufferPool: evicted experts' memory)
    assert offloader.stats.peak_expert_bytes <= budget + dense_expert + offloader._pool.max_free_bytes
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


LOAD_MEMORY_CHILD = """
import json, sys
from pathlib import Path
from lightning_moe.inference import ExpertStore, load_offloaded, load_resident_model, memory_status

def peak():  # (resident set now, peak resident set) in bytes; writing 5 to clear_refs resets the peak
    status = memory_status()
    return status["rss"], status["peak_rss"]

store = ExpertStore(sys.argv[1])
model, offloader = load_offloaded(store)  # warm-up: the first load imports modules (tens of MiB resident)
del model, offloader
Path("/proc/self/clear_refs").write_text("5")
before, _ = peak()
model, offloader = load_offloaded(store)
offloaded = peak()[1] - before
del model, offloader
Path("/proc/self/clear_refs").write_text("5")
before, _ = peak()
model = load_resident_model(store)
resident = peak()[1] - before
print(json.dumps({"offloaded": offloaded, "resident": resident, "experts": store.expert_memory_bytes}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak resident set is read from Linux /proc")
def test_loading_offloaded_never_allocates_the_experts(tokenizer, tmp_path):
    """The process's peak resident set while building from the store stays far below the expert bytes
    (the experts are never allocated), while loading the whole model does grow by them (the check can see it)."""
    torch.manual_seed(0)
    model = build_multimodal(tokenizer, "tiny-llama", {**TINY_LLM, "intermediate_size": 2048}, encoders={})
    upcycle(model, MoEConfig(num_experts=16, top_k=2, layers="all"))  # experts: 48 MiB of float32
    store = export_store(model, tmp_path / "store")
    del model
    done = subprocess.run([sys.executable, "-c", LOAD_MEMORY_CHILD, str(store.directory)], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["experts"] > 40 * 2**20
    assert measured["offloaded"] < 0.2 * measured["experts"], measured
    assert measured["resident"] > 0.9 * measured["experts"], measured


@pytest.mark.skipif(not hasattr(__import__("os"), "posix_fadvise"), reason="page-cache advice is POSIX only")
def test_drop_page_cache_reads_the_same_expert_and_advises_the_kernel_per_file(store, monkeypatch):
    import os

    advised = []
    real = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: advised.append(advice) or
                        real(fd, offset, length, advice))
    cold = ExpertStore(store.directory, drop_page_cache=True)
    assert torch.equal(cold.read(1, 2).w_in, store.read(1, 2).w_in)
    assert advised == [os.POSIX_FADV_DONTNEED]  # the cold store only; the default store gives no advice
    cold.evict_page_cache()
    assert len(advised) == 1 + len(store.entries)


def test_safetensors_views_equal_safetensors_own_load(store, tmp_path):
    from safetensors.torch import load, save

    from lightning_moe.inference.store import safetensors_views

    mixed = {"codes": torch.arange(7, dtype=torch.uint8), "scale": torch.randn(3, 2), "lo": torch.randn(5).double()}
    files = [save(mixed)] + [(store.directory / e.file).read_bytes() for e in store.entries.values()]
    for data in files:
        views = safetensors_views(torch.frombuffer(bytearray(data), dtype=torch.uint8), "x.safetensors")
        oracle = load(data)
        assert views.keys() == oracle.keys()
        for name, tensor in oracle.items():
            assert views[name].dtype == tensor.dtype and torch.equal(views[name], tensor)
    with pytest.raises(StoreError, match="x.safetensors"):
        safetensors_views(torch.tensor([200, 0, 0, 0, 0, 0, 0, 0, 1], dtype=torch.uint8), "x.safetensors")


def test_buffer_pool_reuses_retired_buffers_only_after_the_next_layer_call_starts():
    from lightning_moe.inference import BufferPool

    granule = BufferPool.SMALL_GRANULE
    pool = BufferPool(max_free_bytes=2 * granule)
    a = pool.take(40)
    assert a.numel() == granule  # sizes round up to the granule (a page below 1 MiB)
    assert pool.take((1 << 20) + 1).numel() == (1 << 20) + BufferPool.GRANULE
    pool.retire((a,))
    assert pool.take(40) is not a  # may still be read by the layer computing now
    pool.advance()
    assert pool.take(granule - 1) is a and pool.free_bytes == 0
    b, c, d = pool.take(40), pool.take(40), pool.take(40)
    pool.release((b, c, d))  # the third would pass the cap: dropped to the allocator
    again = pool.take(40)
    assert pool.free_bytes == granule and (again is b or again is c)


def test_lookahead_predicts_what_the_next_layers_router_picks(store, sparse_model):
    offloader = ExpertOffloader(ExpertStore(store.directory), 8 * store.largest_expert_bytes, prefetch=True,
                                prediction="lookahead")
    with pytest.raises(ValueError, match="needs a routing profile"):
        ExpertOffloader(ExpertStore(store.directory), 8 * store.largest_expert_bytes, prefetch=True)
    router = expert_layers(sparse_model)[1][1].router
    offloader.routers[1] = router  # what OffloadedSparseMoE does; the predictor shares the offloader's dict
    predictor = offloader.predictor
    assert isinstance(predictor, LookaheadPredictor)
    hidden = torch.randn(1, 64)
    assert sorted(predictor.predict(1, None, hidden)) == sorted(router(hidden).indices[0].tolist())  # width = top_k = 2
    assert predictor.predict(0, [1], hidden) == []  # the next token's first layer: its input is not known yet
    tokens = torch.randn(5, 64)
    routing = router(tokens)
    picked = sorted(set(routing.indices.reshape(-1).tolist()))
    mass = {e: float(routing.probs[:, e].sum()) for e in picked}
    assert predictor.predict(1, [0], tokens) == sorted(picked, key=mass.get, reverse=True)[:2]  # most probable first


def test_buffers_retired_while_a_background_job_runs_stay_reserved_until_it_ends():
    from lightning_moe.inference import BufferPool

    pool = BufferPool(max_free_bytes=1 << 20)
    job = pool.begin_job()  # e.g. the prefetch thread dequantising a cached expert
    a = pool.take(100)
    pool.retire((a,))  # the decoding thread evicts that expert meanwhile
    pool.advance()
    assert pool.take(100) is not a  # the job may still read it
    pool.end_job(job)
    pool.advance()
    assert pool.take(100) is a


def test_staged_experts_survive_until_their_group_of_the_layer_call_uses_them(sparse_model, tmp_path):
    store = export_store(sparse_model, tmp_path / "int4", bits=4)
    offloader = ExpertOffloader(store, 8 * store.largest_expert_bytes, "lru", _scripted_profile(), prefetch=True)
    offloader.prefetch(1, [3])  # loaded packed and dequantised ahead on the prefetch thread
    offloader.wait_prefetches()
    offloader.expert_stack(1, [2], chosen=[2, 3])  # first group of a call that also routes to expert 3
    assert (1, 3) in offloader._staged
    w_in, _, _, _ = offloader.expert_stack(1, [3], chosen=[2, 3], predict=False)
    assert offloader.stats.staged_hits == 1 and (1, 3) not in offloader._staged
    torch.testing.assert_close(w_in[0], store.read(1, 3).dense()[0])
    offloader.close()
    issued = offloader.stats.prefetch_issued
    offloader.expert_stack(0, [1])  # closed: no prefetch thread, loading on demand still works
    assert offloader.stats.prefetch_issued == issued


def test_dense_cache_does_not_prefetch_experts_it_already_holds(sparse_model, tmp_path):
    store = export_store(sparse_model, tmp_path / "int4", bits=4)
    dense = 4 * (expert_layers(sparse_model)[0][1].w_in[0].numel() + expert_layers(sparse_model)[0][1].down_proj[0].numel())
    offloader = ExpertOffloader(store, 8 * dense, "lru", _scripted_profile(), prefetch=True, dequantize_on_load=True)
    for _ in range(3):
        offloader.prefetch(1, [3])
        offloader.wait_prefetches()
    assert offloader.stats.prefetch_issued == 1 and offloader._in_flight == 0
    offloader.close()

"""KV-cache generation: greedy equals Hugging Face's generate; sampling controls; offloaded float32
experts give exactly the in-memory tokens; `main.py predict` writes predictions through the writer."""

from __future__ import annotations

import json

import torch

from lightning_moe.cli import main
from lightning_moe.inference import (ExpertStore, GenerationConfig, RoutingProfile, generate, load_offloaded, offload,
                                     profile_routing)
from lightning_moe.inference.generation import sample_next
from tests.conftest import ROOT
from tests.inference.conftest import make_sparse_model, prompt_batch


def _config(tokenizer, n: int = 8, **kwargs) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=n, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                            **kwargs)


def test_greedy_kv_cache_generation_matches_hugging_face_generate(sparse_model, tokenizer):
    ids, mask, pixels = prompt_batch(sparse_model)
    oracle = sparse_model.generate(ids, mask, max_new_tokens=8, pixel_values=pixels,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    out = generate(sparse_model, ids, mask, _config(tokenizer), pixel_values=pixels)
    assert torch.equal(out.tokens, oracle)
    assert out.decode_steps == out.tokens.shape[1] - 1 and out.decode_tokens_per_second > 0


def test_sampling_is_seeded_and_top_k_one_is_greedy(sparse_model, tokenizer):
    ids, mask, pixels = prompt_batch(sparse_model)
    greedy = generate(sparse_model, ids, mask, _config(tokenizer), pixel_values=pixels).tokens
    top1 = generate(sparse_model, ids, mask, _config(tokenizer, do_sample=True, top_k=1),
                    torch.Generator().manual_seed(0), pixel_values=pixels).tokens
    assert torch.equal(top1, greedy)
    draws = [generate(sparse_model, ids, mask, _config(tokenizer, do_sample=True, temperature=5.0),
                      torch.Generator().manual_seed(s), pixel_values=pixels).tokens for s in (3, 3, 4)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    config = GenerationConfig(do_sample=True, top_p=0.75)
    drawn = {int(sample_next(logits, config, torch.Generator().manual_seed(s))) for s in range(200)}
    assert drawn == {0, 1}  # 0.5 < 0.75 <= 0.5 + 0.3


def test_offloaded_float32_generation_gives_exactly_the_in_memory_tokens(tokenizer, tmp_path):
    model = make_sparse_model(tokenizer)
    ids, mask, pixels = prompt_batch(model)
    config = _config(tokenizer, 10)
    reference = generate(model, ids, mask, config, pixel_values=pixels).tokens
    profile = profile_routing(model, [{"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}])
    from lightning_moe.inference import export_store

    store = export_store(model, tmp_path / "store")
    three = 3 * store.largest_expert_bytes  # fewer than one layer's 4 experts: the cache must evict
    # on demand, LRU cache, EdgeMoE (frequency/distance eviction + prediction + prefetch), built from the store
    # and lookahead prediction (the next layer's router on this layer's input)
    for kwargs in ({}, {"budget_bytes": three}, {"budget_bytes": three, "policy": "freq_distance",
                                                   "profile": profile, "prefetch": True},
                   {"budget_bytes": three, "prefetch": True, "prediction": "lookahead"}):
        loaded, offloader = load_offloaded(ExpertStore(store.directory), **kwargs)
        tokens = generate(loaded, ids, mask, config, pixel_values=pixels).tokens
        offloader.close()
        assert torch.equal(tokens, reference), kwargs
        assert offloader.stats.misses > 0
        if kwargs.get("prefetch"):
            assert offloader.stats.prefetch_issued > 0
        if offloader.cache is not None:
            assert offloader.cache.peak_bytes <= three and offloader.cache.evictions > 0
    offloader = offload(model, store, budget_bytes=three)  # in place, on the model the store came from
    assert torch.equal(generate(model, ids, mask, config, pixel_values=pixels).tokens, reference)
    assert isinstance(profile, RoutingProfile) and profile.tokens == int(mask.sum()) + 2 * 15  # 16 patches per image


def test_predict_writes_jsonl_through_the_prediction_writer(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["predict", "--config", str(ROOT / "configs/quickstart.yaml"), "--trainer.logger=false",
          "--trainer.enable_progress_bar=false", "--trainer.limit_predict_batches=1",
          "--data.init_args.eval_batch_size=3", "--data.init_args.max_eval_samples_per_domain=3",
          "--trainer.callbacks+=lightning_moe.callbacks.PredictionWriter",
          f"--trainer.callbacks.output_dir={tmp_path / 'pred'}"])
    lines = (tmp_path / "pred" / "predictions.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 5 * 3  # one batch from each of the five domains' test loaders
    assert {"id", "domain", "prediction", "answer"} <= set(records[0])

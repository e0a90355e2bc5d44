"""A sparse tiny model learns from the shipped data: a real threshold on held-out validation data."""

from __future__ import annotations

import lightning as L
import pytest

from lightning_moe.data import DomainMixtureDataModule
from lightning_moe.methods import BackboneConfig, MoETuning
from lightning_moe.models import MoEConfig
from tests.conftest import ROOT, TOKENIZER


@pytest.mark.slow  # 200 training steps at batch 64 and a generated answer for 400 held-out samples
def test_sparse_model_learns_count_and_colour_well_above_chance(tmp_path):
    L.seed_everything(0)
    domains = {d: {"train": f"{d}/train.jsonl", "val": f"{d}/val.jsonl"} for d in ("count", "colour")}
    data = DomainMixtureDataModule(domains, root=str(ROOT / "data/shapes"), tokenizer=TOKENIZER, batch_size=64,
                                   eval_batch_size=200, max_eval_samples_per_domain=200)
    method = MoETuning(stage="moe", trainable=["llm", "connector"], train_vision_tower=True, tokenizer=TOKENIZER,
                       backbone=BackboneConfig(encoders={"image": {"tower": "tiny-clip", "feature_layer": -1}}), moe=MoEConfig(num_experts=4, top_k=2),
                       optimizer=lambda params: __import__("torch").optim.AdamW(params, lr=5e-4, weight_decay=0.0),
                       max_new_tokens=3)
    trainer = L.Trainer(max_steps=200, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, gradient_clip_val=1.0, num_sanity_val_steps=0,
                        val_check_interval=200, check_val_every_n_epoch=None, default_root_dir=tmp_path)
    trainer.fit(method, data)  # validates once, on held-out data, after the last step
    merged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    # chance is 25% on both domains (four answers each, balanced)
    assert merged["val/count/exact_match"] > 0.8, merged
    assert merged["val/colour/exact_match"] > 0.6, merged

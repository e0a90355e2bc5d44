"""`main.py predict` with the `ExpertOffloading` callback and the method's generation settings,
end to end through the CLI: a tiny sparse model trained a few steps, exported to a float32 store,
predicts the same answers with its experts on storage as resident; seeded sampling reproduces."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from lightning_moe.callbacks import ExpertOffloading
from lightning_moe.cli import main
from lightning_moe.edge import main as edge_main
from lightning_moe.inference import OffloadedSparseMoE, StoreError, export_store
from lightning_moe.methods.base import GenerationSettings
from lightning_moe.models import build_multimodal
from tests.conftest import ROOT, TINY_LLM, tiny_encoders
from tests.inference.conftest import make_sparse_model
from tests.test_cli import FAST

QUICKSTART = str(ROOT / "configs/quickstart.yaml")
# 8 test samples of each of the 5 domains, one batch per domain
PREDICT = ["--config", QUICKSTART, "--trainer.enable_progress_bar=false", "--data.init_args.eval_batch_size=8",
           "--data.init_args.max_eval_samples_per_domain=8"]
SAMPLE = ["--model.init_args.generation.do_sample=true", "--model.init_args.generation.temperature=1.5"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A quickstart model trained 30 steps (a checkpoint) and its float32 expert store."""
    work = tmp_path_factory.mktemp("edge_predict")
    cwd = os.getcwd()
    os.chdir(work)  # runs/ lands here; shipped data paths fall back to the repository
    try:
        # 30 steps: greedy answers are words (after 2, nearly all are empty); sampled ones differ from sample to sample
        main(["fit", "--config", QUICKSTART, *FAST, "--trainer.max_steps=30", "--trainer.limit_train_batches=30",
              "--trainer.val_check_interval=30"])
        ckpt = next((work / "runs/quickstart").rglob("last.ckpt"))
        edge_main(["export", "--model", str(ckpt), "--out", str(work / "store")])
        yield SimpleNamespace(work=work, ckpt=ckpt, store=work / "store")
    finally:
        os.chdir(cwd)


def predict(trained, out: str, *extra: str):
    """`main.py predict` writing `<out>/predictions.jsonl`; returns the CLI and the records."""
    cli = main(["predict", *PREDICT, "--ckpt_path", str(trained.ckpt),
                "--trainer.callbacks+=lightning_moe.callbacks.PredictionWriter",
                f"--trainer.callbacks.output_dir={trained.work / out}", *extra])
    lines = (trained.work / out / "predictions.jsonl").read_text().splitlines()
    return cli, [json.loads(line) for line in lines]


def offloading(trained, out: str) -> list[str]:
    # half of the expert bytes: 2 of the 4 experts fit, so experts are evicted and read again
    return ["--trainer.callbacks+=lightning_moe.callbacks.ExpertOffloading", f"--trainer.callbacks.store={trained.store}",
            "--trainer.callbacks.budget_fraction=0.5", f"--trainer.callbacks.stats_path={trained.work / out / 'offload.json'}"]


def test_predict_with_offloaded_experts_equals_resident_greedy_and_seeded_sampling_reproduces(trained):
    _, resident = predict(trained, "resident")
    assert len(resident) == 40 and {r["domain"] for r in resident} == {"colour", "count", "pope", "position_lr",
                                                                        "position_tb"}
    cli, offloaded = predict(trained, "offloaded", *offloading(trained, "offloaded"))
    # the offloaded path ran (counters below); afterwards the resident layers are back in place
    assert not any(isinstance(m, OffloadedSparseMoE) for m in cli.model.model.modules())
    assert offloaded == resident  # float32 experts: exactly the resident greedy answers
    stats = json.loads((trained.work / "offloaded/offload.json").read_text())
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, ExpertOffloading))
    assert stats == callback.stats and stats["misses"] > 0 and stats["bytes_read"] > 0
    assert stats["evictions"] > 0  # the budget held 2 of the 4 experts

    cli, sampled = predict(trained, "sampled", *SAMPLE)
    assert cli.model.generation.do_sample  # the command line's setting, not the checkpoint's
    _, sampled_again = predict(trained, "sampled_offloaded", *SAMPLE, *offloading(trained, "sampled_offloaded"))
    # same seed (default 0), same draws: reproducible, and offloading changes no logit (float32 experts)
    assert sampled_again == sampled
    assert [r["prediction"] for r in sampled] != [r["prediction"] for r in resident]  # not greedy


def test_test_with_offloaded_experts_gives_the_resident_metrics(trained):
    args = ["test", *PREDICT, "--ckpt_path", str(trained.ckpt), "--trainer.limit_test_batches=1"]
    resident = main(args).trainer.callback_metrics
    cli = main(args + offloading(trained, "tested"))
    assert not any(isinstance(m, OffloadedSparseMoE) for m in cli.model.model.modules())  # restored after the run
    assert cli.model._routed and not any(isinstance(m, OffloadedSparseMoE) for m in cli.model._routed)
    offloaded = cli.trainer.callback_metrics
    assert "test/exact_match" in resident and "test/count/lm_loss" in resident
    assert {k: float(v) for k, v in offloaded.items()} == {k: float(v) for k, v in resident.items()}
    assert json.loads((trained.work / "tested/offload.json").read_text())["misses"] > 0


def test_expert_offloading_refuses_bad_input(tmp_path, tokenizer):
    sparse = make_sparse_model(tokenizer)
    export_store(sparse, tmp_path / "store")
    dense = build_multimodal(tokenizer, "tiny-llama", TINY_LLM, tiny_encoders(-1))
    with pytest.raises(ValueError, match="no SparseMoE layer"):
        ExpertOffloading(store=str(tmp_path / "store"))._start(SimpleNamespace(model=dense))
    with pytest.raises(StoreError, match="not found"):
        ExpertOffloading(store=str(tmp_path / "missing"))._start(SimpleNamespace(model=sparse))
    with pytest.raises(StoreError, match="another model"):
        ExpertOffloading(store=str(tmp_path / "store"))._start(SimpleNamespace(model=make_sparse_model(tokenizer, seed=1)))
    with pytest.raises(ValueError, match="not both"):
        ExpertOffloading(store=str(tmp_path / "store"), budget_fraction=0.5, budget_mb=1.0)
    with pytest.raises(ValueError, match="smaller than the largest expert"):
        ExpertOffloading(store=str(tmp_path / "store"), budget_mb=1e-6)._start(SimpleNamespace(model=sparse))
    with pytest.raises(FileNotFoundError, match="routing profile"):
        ExpertOffloading(store=str(tmp_path / "store"), budget_fraction=0.5, prefetch=True)._start(
            SimpleNamespace(model=sparse))
    with pytest.raises(ValueError, match="temperature"):
        GenerationSettings(do_sample=True, temperature=0.0).generate_kwargs()
    for bad, field in [(dict(do_sample=True, top_k=-1), "top_k"), (dict(do_sample=True, top_p=0.0), "top_p"),
                       (dict(do_sample=True, top_p=1.5), "top_p"), (dict(max_new_tokens=0), "max_new_tokens")]:
        with pytest.raises(ValueError, match=field):
            GenerationSettings(**bad).generate_kwargs()

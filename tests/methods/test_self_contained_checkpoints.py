"""Self-contained checkpoints (methods/from_checkpoint.py): every method class's checkpoint loads with
`load_from_checkpoint`, and serves `main.py test|predict --ckpt_path`, from another working directory after
the directories it was trained from (base model, tokenizer, adapters, teacher; all named by relative paths)
were renamed away, with bit-identical logits; the teacher is not loaded for that."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_moe.methods import (
    BackboneConfig,
    ContinualLoRA,
    LoRAOptions,
    LoRATuning,
    MoDDistillation,
    MoETuning,
    MoLE,
    MoRAContinual,
)
from lightning_moe.models import AdapterRule, MoEConfig, add_adapters, build_multimodal, save_adapters
from lightning_moe.tokens import load_tokenizer
from tests.conftest import ROOT, TINY_LLM, TOKENIZER, tiny_encoders

SMALL_LORA = LoRAOptions(r=2, alpha=4, dropout=0.0, targets=["q_proj", "up_proj"])
MOE = MoEConfig(num_experts=2, top_k=1, layers=[0])
# class, constructor arguments; the paths are relative to the run directory and live under stages/
METHODS = {
    "moe_tuning": (MoETuning, dict(stage="moe", moe=MOE)),
    "lora_from_adapters": (LoRATuning, dict(adapters_path="stages/adapters")),
    "mole": (MoLE, dict(lora=SMALL_LORA)),
    "mod": (MoDDistillation, dict(teacher="stages/teacher", stage="mimic_sparse", moe=MOE)),
    "continual_lora": (ContinualLoRA, dict(lora=SMALL_LORA)),
    "mora": (MoRAContinual, dict(lora=SMALL_LORA)),
}


def _stages(run: Path) -> None:
    """A base model, a tokenizer, LoRA adapters and a teacher, as earlier stages would have written them."""
    tokenizer = load_tokenizer(TOKENIZER)
    tokenizer.save_pretrained(run / "stages/tok")
    torch.manual_seed(0)
    base = build_multimodal(tokenizer, "tiny-llama", TINY_LLM, tiny_encoders())
    base.save_pretrained(run / "stages/base")
    base.save_pretrained(run / "stages/teacher")
    add_adapters(base, [AdapterRule(kind="lora", targets=["q_proj"], r=2, alpha=4)])
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "lora_B" in name:
                p.normal_()
    save_adapters(base, run / "stages/adapters")


def _checkpoint(method: L.LightningModule, path: Path) -> Path:
    """Lightning's own checkpoint of the module (hooks and hyperparameters included), without a training run."""
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(method)
    trainer.save_checkpoint(path)
    return path


def _logits(method) -> torch.Tensor:
    ids = torch.tensor([[5, 11, 4, 12, 13], [14, 4, 15, 16, 17]])  # id 4 is <image>
    torch.manual_seed(3)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        return method.eval().model(ids, torch.ones_like(ids), pixel_values=pixels).logits


@pytest.mark.parametrize("name", list(METHODS))
def test_load_from_checkpoint_anywhere_after_the_stages_moved(tmp_path, monkeypatch, name):
    cls, kwargs = METHODS[name]
    run = tmp_path / "run"
    _stages(run)
    monkeypatch.chdir(run)
    torch.manual_seed(1)
    method = cls(tokenizer="stages/tok", backbone=BackboneConfig(pretrained="stages/base"), **kwargs)
    with torch.no_grad():  # trained weights: not what any stage directory holds
        for p in method.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    expected = _logits(method)
    ckpt = _checkpoint(method, run / "method.ckpt").resolve()
    (run / "stages").rename(tmp_path / "moved")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = cls.load_from_checkpoint(ckpt, map_location="cpu")
    assert type(loaded) is cls and loaded.stage == method.stage
    assert loaded.model.surgery == method.model.surgery
    assert torch.equal(_logits(loaded), expected)
    assert len(loaded.tokenizer) == len(method.tokenizer)
    if cls is MoDDistillation:
        assert "teacher" not in loaded._modules  # evaluation never loads it
    # the checkpoint's state dict and the rebuilt model agree (load_from_checkpoint is strict)
    assert set(loaded.state_dict()) == set(torch.load(ckpt, weights_only=True)["state_dict"])


def test_a_missing_stage_directory_is_named_without_a_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="'stages/base' is neither a local directory"):
        MoETuning(tokenizer=TOKENIZER, backbone=BackboneConfig(pretrained="stages/base"))


def test_cli_test_and_predict_with_ckpt_path_after_the_stages_moved(tmp_path, monkeypatch):
    from lightning_moe.cli import main

    run = tmp_path / "run"
    _stages(run)
    monkeypatch.chdir(run)
    data = ["--trainer.enable_progress_bar=false", "--data.init_args.batch_size=4", "--data.init_args.eval_batch_size=4",
            "--data.init_args.max_eval_samples_per_domain=4", "--trainer.limit_test_batches=1",
            "--trainer.limit_predict_batches=1", "--model.init_args.max_new_tokens=2"]
    stage3 = ["--config", str(ROOT / "configs/moe_llava/stage3_moe.yaml"), *data]
    fit = main(["fit", *stage3, "--model.init_args.backbone.pretrained=stages/base",
                "--data.init_args.tokenizer=stages/tok", "--trainer.max_steps=1", "--trainer.limit_val_batches=0",
                "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
                f"--trainer.callbacks.dirpath={tmp_path / 'ckpt'}", "--trainer.callbacks.every_n_train_steps=1"])
    ckpt = next((tmp_path / "ckpt").glob("*.ckpt"))
    for produced in ("stages", "runs"):  # the inputs, and the stage output SavePretrained wrote
        (run / produced).rename(tmp_path / f"moved_{produced}")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    common = [*stage3, f"--data.init_args.tokenizer={TOKENIZER}", "--ckpt_path", str(ckpt)]
    cli = main(["test", *common])
    assert cli.model.model.surgery == fit.model.model.surgery and cli.trainer.callback_metrics  # it evaluated
    main(["predict", *common, "--trainer.callbacks+=lightning_moe.callbacks.PredictionWriter",
          f"--trainer.callbacks.output_dir={tmp_path / 'pred'}"])
    lines = (tmp_path / "pred" / "predictions.jsonl").read_text().splitlines()
    assert lines and all("prediction" in json.loads(line) for line in lines)

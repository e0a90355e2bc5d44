"""The CLI end to end: every shipped config runs a few steps; the MoE-LLaVA stages chain; a user's
method subclass runs through `--model`; TensorBoard gets the expected tags; configs merge."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_moe.cli import main
from lightning_moe.methods import MoETuning
from tests.conftest import ROOT
from tests.real_model import requires_real_model

# configs/_base/ holds the parts every config includes (trainer, data), not runnable configs; configs/strategies/
# holds trainer-only files composed after a method's config (tests/distributed/test_strategies.py)
CONFIGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml")
                 if not {"_base", "strategies"} & set(p.relative_to(ROOT / "configs").parts))
STAGES = ["configs/moe_llava/stage1_align.yaml", "configs/moe_llava/stage2_instruct.yaml",
          "configs/moe_llava/stage3_moe.yaml"]
# LLaVA-MoD: the teacher, then the student's stages, each reading the previous outputs
MOD_STAGES = ["configs/mod/teacher.yaml", "configs/mod/mimic_dense.yaml", "configs/mod/mimic_sparse.yaml",
              "configs/mod/preference.yaml"]
# the continual run starts from the pre-training's output: chained below
MORA = ["configs/mora/pretrain.yaml", "configs/mora/continual.yaml"]
MOLE = ["configs/mole/base.yaml", "configs/mole/lora.yaml", "configs/mole/mole.yaml"]  # base first, then adapters
# Uni-MoE: align, one experts run per modality, moe (tests/methods/test_unimoe_cli.py)
UNIMOE = ["configs/unimoe/align.yaml", "configs/unimoe/experts.yaml", "configs/unimoe/experts_video.yaml",
          "configs/unimoe/experts_image.yaml", "configs/unimoe/moe.yaml"]
# MoE-LLaVA's stages on the packaged SmolLM2 (docs/real_model.md): the `real` extra
REAL = ["configs/real/stage1_align.yaml", "configs/real/stage2_instruct.yaml", "configs/real/stage3_moe.yaml"]
CHAINED = STAGES + MOD_STAGES + MORA + MOLE + UNIMOE + REAL  # each chain has its own test; the rest run one by one
# A few steps on a few samples: the point is that every piece runs, not that it learns.
FAST = ["--trainer.max_steps=2", "--trainer.limit_train_batches=2", "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1", "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false", "--data.init_args.batch_size=4", "--data.init_args.eval_batch_size=8",
        "--data.init_args.max_eval_samples_per_domain=8", "--data.init_args.max_train_samples_per_domain=64"]
# a 135M-parameter LLM: fewer samples still (one validation batch of two per domain)
REAL_FAST = ["--data.init_args.batch_size=2", "--data.init_args.eval_batch_size=2",
             "--data.init_args.max_eval_samples_per_domain=2", "--data.init_args.max_train_samples_per_domain=8"]


class CountingMoETuning(MoETuning):
    """A user's method: subclasses a shipped one and changes one thing."""

    steps_seen = 0

    def training_step(self, batch, batch_idx):
        CountingMoETuning.steps_seen += 1
        return super().training_step(batch, batch_idx)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    # outputs (runs/...) land here; shipped data paths fall back to the repository (lightning_moe/paths.py)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def fit(config: str | list[str], *extra: str):
    configs = [config] if isinstance(config, str) else config
    args = ["fit"] + [a for c in configs for a in ("--config", str(ROOT / c))] + FAST + list(extra)
    return main(args)


def assert_outputs_load_safely(workdir: Path) -> None:
    """Every checkpoint and model directory a run wrote loads on the safe path (no opt-in needed)."""
    from lightning_moe.formats import load_backbone
    from lightning_moe.safe_load import load_torch_file

    checkpoints = sorted(workdir.rglob("*.ckpt"))
    directories = sorted(p.parent for p in workdir.rglob("multimodal_config.json"))
    assert checkpoints, f"no checkpoint written under {workdir}"
    for path in checkpoints:
        assert "multimodal_config" in load_torch_file(path)
        load_backbone(path)
    for path in directories:
        load_backbone(path)


def test_configs_are_shipped():
    assert "configs/quickstart.yaml" in CONFIGS and set(CHAINED) <= set(CONFIGS)
    assert len(CONFIGS) == 21 and not any("_base" in c for c in CONFIGS)


@pytest.mark.parametrize("config", [c for c in CONFIGS if c not in CHAINED])
def test_shipped_config_runs_a_few_steps(workdir, config):
    cli = fit(config)
    assert cli.trainer.global_step == 2
    assert_outputs_load_safely(workdir)


def test_moe_llava_stages_chain_through_their_outputs(workdir):
    for stage in STAGES:
        cli = fit(stage)
        assert cli.trainer.global_step == 2
    assert (workdir / "runs/moe_llava/stage1/model/model.safetensors").is_file()
    assert (workdir / "runs/moe_llava/stage2/model/model.safetensors").is_file()
    assert cli.model.stage == "moe" and cli.model.model.surgery[0]["op"] == "upcycle"
    assert_outputs_load_safely(workdir)


@requires_real_model
@pytest.mark.slow  # three stages of a 135M-parameter LLM
def test_real_model_stages_chain_through_their_outputs(workdir):
    for stage in REAL:
        # each stage reads the previous one's model directory; only the last writes a Lightning checkpoint (the
        # tiny chain above checks every stage's), which saves writing and reading back about 2 GB
        cli = fit(stage, *REAL_FAST, *([] if stage == REAL[-1] else ["--trainer.enable_checkpointing=false"]))
        assert cli.trainer.global_step == 2
    model = cli.model.model
    assert model.llm.config.num_hidden_layers == 30 and model.llm.config.hidden_size == 576
    assert cli.model.stage == "moe" and model.surgery[0]["op"] == "upcycle" and len(model.surgery[0]["layers"]) == 15
    # the placeholders follow the GGUF's 49152 tokens: the embeddings grew by them
    assert model.llm.get_input_embeddings().num_embeddings == len(cli.model.tokenizer) == 49155
    assert_outputs_load_safely(workdir)


def _scalars(cli, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(cli.trainer.logger.log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return [e.value for e in events.Scalars(tag)]


@pytest.mark.slow  # four shipped configs (a larger teacher), 4 steps per mimic stage
def test_mod_stages_chain_through_their_outputs(workdir):
    """Each stage runs from the previous one's output and changes what it should: the student's KL to the
    teacher falls over the mimic steps; the preference steps widen the student's margin over the teacher."""
    from lightning_moe.formats import load_backbone

    steps = ["--trainer.max_steps=4", "--trainer.log_every_n_steps=1"]
    for stage in MOD_STAGES:
        cli = fit(stage, *(steps if "mimic" in stage else []))
        assert cli.trainer.global_step == (4 if "mimic" in stage else 2)
        if "mimic" in stage:
            kd = _scalars(cli, "train/kd_loss")
            assert len(kd) == 4 and kd[-1] < kd[0], (stage, kd)
    # the preference stage's margin on its first batch, with the student it started from and the one it made
    method = cli.model.train()
    batch = next(iter(cli.datamodule.train_dataloader()))
    with torch.no_grad():
        after = method.compute_loss(batch).logs["rewards/margin"].item()
        method.model.load_state_dict(load_backbone(workdir / "runs/mod/mimic_sparse/model").state_dict())
        before = method.compute_loss(batch).logs["rewards/margin"].item()
    assert after > before, (before, after)
    for output in ("teacher", "mimic_dense", "mimic_sparse", "preference"):
        assert (workdir / f"runs/mod/{output}/model/model.safetensors").is_file()
    assert cli.model.stage == "preference" and cli.model.model.surgery[0]["op"] == "upcycle"
    from lightning_moe.safe_load import load_torch_file

    preference_ckpt = next((workdir / "runs/mod/preference").rglob("*.ckpt"))
    assert not any(k.startswith("teacher.") for k in load_torch_file(preference_ckpt)["state_dict"])
    assert_outputs_load_safely(workdir)


def test_mora_continual_chains_from_its_pretraining_and_trains_every_task(workdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fit(MORA[0])
    assert (workdir / "runs/mora/pretrain/model/model.safetensors").is_file()
    # one step per task, every task evaluated after each task (epoch = task)
    cli = fit(MORA[1], "--trainer.max_steps=-1", "--trainer.val_check_interval=1.0", "--trainer.log_every_n_steps=1",
              "--data.init_args.steps_per_task=1")
    tasks = cli.datamodule.task_names
    assert cli.trainer.global_step == len(tasks) == 3
    assert cli.model.task_loop.accuracy.matrix().shape == (3, 3)
    assert [len(m.lora_A) for m in cli.model.mora_layers[:1]] == [3]  # ranks added for tasks 1 and 2
    events = EventAccumulator(str(cli.trainer.logger.log_dir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert "continual/accuracy_matrix" in events.Tags()["images"]
    assert {f"continual/acc/{t}" for t in tasks} | {"continual/last", "continual/bwt"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Images("continual/accuracy_matrix")] == [0, 1, 2]
    assert events.Images("continual/accuracy_matrix")[-1].width >= 300  # task names and values drawn
    # the config keeps one checkpoint per task; Lightning's resume from the one after task 0 rebuilds
    # the later tasks' ranks and ends exactly as the uninterrupted run
    checkpoints = Path(cli.trainer.logger.log_dir) / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("*.ckpt")) == ["task0.ckpt", "task1.ckpt", "task2.ckpt"]
    resumed = fit(MORA[1], "--trainer.max_steps=-1", "--trainer.val_check_interval=1.0",
                  "--data.init_args.steps_per_task=1", f"--ckpt_path={checkpoints / 'task0.ckpt'}")
    assert resumed.trainer.global_step == 3
    torch.testing.assert_close(resumed.model.task_loop.accuracy.matrix(), cli.model.task_loop.accuracy.matrix(),
                               rtol=0, atol=0)
    final, again = cli.model.model.state_dict(), resumed.model.model.state_dict()
    assert final.keys() == again.keys() and all(torch.equal(final[k], again[k]) for k in final)
    assert_outputs_load_safely(workdir)


def test_how_often_a_run_validates_does_not_change_its_training(workdir):
    """Plain LoRA with dropout (drawn from torch's global generator) trains to the same weights whether it
    validates after every step, with a sanity check first, or never: an evaluation loader draws from a generator
    of its own (data/datamodule.py)."""
    fit("configs/mole/base.yaml")
    weights = []
    for validation in (["--trainer.val_check_interval=1", "--trainer.num_sanity_val_steps=1"],
                       ["--trainer.limit_val_batches=0"]):
        cli = fit("configs/mole/lora.yaml", "--trainer.max_steps=3", "--trainer.limit_train_batches=3", *validation)
        assert cli.trainer.global_step == 3 and cli.model.hparams["lora"]["dropout"] > 0
        weights.append({n: p.detach().clone() for n, p in cli.model.named_parameters() if p.requires_grad})
    assert weights[0].keys() == weights[1].keys() and weights[0]
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])


def test_mole_configs_chain_from_the_base_and_log_routing(workdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for config in MOLE:
        cli = fit(config, "--trainer.log_every_n_steps=1")
        assert cli.trainer.global_step == 2
    assert (workdir / "runs/mole/base/model/model.safetensors").is_file()
    for run in ("lora", "mole"):
        assert (workdir / f"runs/mole/{run}/adapters/adapter_model.safetensors").is_file()
    assert type(cli.model).__name__ == "MoLE" and cli.model._routed
    events = EventAccumulator(cli.trainer.logger.log_dir, size_guidance={"images": 0, "histograms": 0})
    events.Reload()
    assert "routing/layer0/expert_load" in events.Tags()["histograms"]
    assert "routing/layer1/val_domain_expert_heatmap" in events.Tags()["images"]
    assert "train/step_time_ms" in events.Tags()["scalars"]
    assert_outputs_load_safely(workdir)


def test_model_help_after_model_lists_that_methods_stages(capsys):
    """`fit --model pkg.Method --model.help` (the method named first, then its help) shows the named method's options."""
    with pytest.raises(SystemExit):
        main(["fit", "--model", "lightning_moe.methods.MoETuning", "--model.help"])
    assert "--model.stage {align,instruct,moe}" in capsys.readouterr().out


def test_user_subclass_runs_through_the_model_flag(workdir):
    CountingMoETuning.steps_seen = 0
    cli = fit("configs/quickstart.yaml", "--model=tests.test_cli.CountingMoETuning")
    assert type(cli.model) is CountingMoETuning
    assert CountingMoETuning.steps_seen == 2


def test_quickstart_writes_tensorboard_tags_and_a_checkpoint(workdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cli = fit("configs/quickstart.yaml", "--trainer.log_every_n_steps=1")
    log_dir = Path(cli.trainer.logger.log_dir)
    events = EventAccumulator(str(log_dir), size_guidance={"images": 0, "histograms": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"train/lm_loss", "train/aux_loss", "train/loss", "val/exact_match", "val/lm_loss"} <= set(tags["scalars"])
    assert any(t.startswith("lr-") for t in tags["scalars"])
    assert any(t.endswith("/exact_match") and t.count("/") == 2 for t in tags["scalars"])  # per domain
    assert any(t.endswith("/pope_f1") for t in tags["scalars"])
    assert "routing/layer0/expert_load" in tags["histograms"]
    assert {"routing/layer0/val_domain_expert_heatmap", "routing/layer0/val_expert_load"} <= set(tags["images"])
    heatmap = events.Images("routing/layer0/val_domain_expert_heatmap")[-1]
    assert heatmap.width >= 300 and heatmap.height >= 150  # a labelled matplotlib figure, not 16 px per cell
    assert any(t.startswith("routing/layer0/") and "entropy" in t for t in tags["scalars"])
    assert list(log_dir.rglob("*.ckpt")), "no checkpoint written"


def test_configs_merge_and_print_config_is_complete(workdir, capsys):
    override = workdir / "override.yaml"
    override.write_text("model:\n  init_args:\n    max_new_tokens: 3\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--config", str(override), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "max_new_tokens: 3" in printed and "class_path: lightning_moe.methods.MoETuning" in printed
    assert "num_experts: 4" in printed  # defaults are filled in, not only what the files say

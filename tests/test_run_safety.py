"""Nothing lost, nothing silent: exact resume after kill -9 (mixture and continual DataModules, mid-epoch
and end-of-epoch), the non-finite guard, atomic checkpoint writes, and one-line errors.

Killed runs are subprocesses (`python main.py fit ...` killed with SIGKILL by a test callback from
tests/run_safety_helpers.py); the runs they are compared with run in this process on one thread, as
the subprocesses do, so that float results can be compared bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_moe.callbacks.checkpoint_io import TMP_PREFIX, atomic_write_bytes
from lightning_moe.cli import main
from tests.conftest import ROOT, TINY_LLM, tiny_encoders
from tests.run_safety_helpers import trainable_weights

TINY = [f"--model.init_args.backbone.llm_overrides={json.dumps(TINY_LLM)}",
        f"--model.init_args.backbone.encoders={json.dumps(tiny_encoders(-1))}"]  # quickstart's, smaller
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.limit_val_batches=0",
         "--trainer.num_sanity_val_steps=0", "--data.init_args.batch_size=4"]
# the mixture: 4 batches per epoch (weighted draws of 16 samples), so step 6 is mid-epoch 1 and step 4 ends epoch 0
MIXTURE = ["fit", "--config", str(ROOT / "configs/quickstart.yaml"), *TINY, *QUIET, "--data.init_args.samples_per_epoch=16"]


def every_step_checkpoints(tmp: Path, name: str) -> list[str]:
    """A config replacing the shipped callbacks by a checkpoint after every step into tmp/name."""
    config = tmp / f"{name}.yaml"
    config.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        f"      init_args: {{dirpath: {tmp / name}, filename: 'step{{step}}', auto_insert_metric_name: false,\n"
        "                  every_n_train_steps: 1, save_top_k: -1, save_last: true}\n")
    return ["--config", str(config)]


def callback(path: str, **init_args) -> str:
    return "--trainer.callbacks+=" + json.dumps({"class_path": path, "init_args": init_args})


def run_main_py(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "main.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **env})


@pytest.fixture
def one_thread(tmp_path, monkeypatch):
    """In-process runs on one thread, in tmp_path (as the subprocess runs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    torch.set_num_threads(threads)


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def checkpoint_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


# ----------------------------------------------------------------------------- exact resume
@pytest.mark.slow  # a killed `python main.py` process plus three in-process runs
def test_mixture_resume_after_kill_mid_epoch_and_from_epoch_end_is_bit_identical(one_thread):
    tmp = one_thread
    args = MIXTURE + ["--trainer.max_steps=10"]
    full = main(args + every_step_checkpoints(tmp, "full"))
    killed = run_main_py(args + every_step_checkpoints(tmp, "killed") + [callback("tests.run_safety_helpers.KillAtStep", step=6)], tmp)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert checkpoint_step(tmp / "killed/last.ckpt") == 6  # mid-epoch 1 (4 batches per epoch)
    resumed = main(args + every_step_checkpoints(tmp, "resumed") + [f"--ckpt_path={tmp / 'killed/last.ckpt'}"])
    assert resumed.trainer.global_step == full.trainer.global_step == 10
    assert_identical(trainable_weights(resumed.model), trainable_weights(full.model))
    # from the checkpoint written by the last batch of epoch 0: epoch 1 must draw epoch 1's order, not epoch 0's again
    from_epoch_end = main(args + every_step_checkpoints(tmp, "epoch_end") + [f"--ckpt_path={tmp / 'full/step4.ckpt'}"])
    assert_identical(trainable_weights(from_epoch_end.model), trainable_weights(full.model))


@pytest.mark.slow  # a killed `python main.py` process plus two in-process runs
def test_continual_resume_after_kill_mid_task_is_bit_identical(one_thread, tokenizer):
    from lightning_moe.models import build_multimodal

    tmp = one_thread
    torch.manual_seed(0)
    build_multimodal(tokenizer, "tiny-llama", TINY_LLM, tiny_encoders(-1)).save_pretrained(tmp / "base")
    # 3 tasks x 3 steps; step 4 is the second batch of task 1
    args = ["fit", "--config", str(ROOT / "configs/mora/continual.yaml"), *QUIET,
            f"--model.init_args.backbone.pretrained={tmp / 'base'}", "--data.init_args.steps_per_task=3"]
    full = main(args + every_step_checkpoints(tmp, "full"))
    killed = run_main_py(args + every_step_checkpoints(tmp, "killed") + [callback("tests.run_safety_helpers.KillAtStep", step=4)], tmp)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert checkpoint_step(tmp / "killed/last.ckpt") == 4
    resumed = main(args + every_step_checkpoints(tmp, "resumed") + [f"--ckpt_path={tmp / 'killed/last.ckpt'}"])
    assert resumed.trainer.global_step == full.trainer.global_step == 9
    assert_identical(trainable_weights(resumed.model), trainable_weights(full.model))


# ----------------------------------------------------------------------------- non-finite guard
def test_nan_stops_the_run_with_step_terms_ids_and_domains_and_keeps_the_last_good_checkpoint(one_thread, capsys):
    tmp_path = one_thread  # in this process: `python main.py` is `lightning_moe.cli.main()`, exit code and all
    with pytest.raises(SystemExit) as exit_info:
        main(MIXTURE + ["--trainer.max_steps=6"] + every_step_checkpoints(tmp_path, "ckpt")
             + [callback("tests.run_safety_helpers.PoisonBatch", step=3)])
    result = capsys.readouterr()
    assert exit_info.value.code == 1, result.err[-3000:]
    poisoned = next(line for line in result.out.splitlines() if line.startswith("POISONED")).split()[1:]
    error = result.err[result.err.index("error: non-finite"):]
    assert "global step 3" in error and "train/lm_loss=nan" in error
    assert all(sample_id in error for sample_id in poisoned)
    assert all(sample_id.split("-")[0] in error for sample_id in poisoned)  # shipped ids start with their domain
    assert "Traceback" not in result.err
    checkpoint = torch.load(tmp_path / "ckpt/last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 3  # written after step 3 trained, before the poisoned batch
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point())
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last.ckpt", "step1.ckpt", "step2.ckpt", "step3.ckpt"]


def test_nan_guard_can_skip_the_step_and_count_it(one_thread):
    guard = callback("lightning_moe.callbacks.NonFiniteGuard", action="skip")
    cli = main(MIXTURE + ["--trainer.max_steps=3", "--trainer.callbacks=[]", guard,
                          callback("tests.run_safety_helpers.PoisonBatch", step=1)])
    guards = [c for c in cli.trainer.callbacks if type(c).__name__ == "NonFiniteGuard"]
    assert len(guards) == 1 and guards[0].skipped == 1 and cli.trainer.global_step == 3
    assert all(torch.isfinite(p).all() for p in cli.model.parameters())


# ----------------------------------------------------------------------------- atomic checkpoints
def test_kill_during_a_checkpoint_write_leaves_the_previous_file_and_no_orphan(tmp_path):
    tmpdir = tmp_path / "elsewhere"
    tmpdir.mkdir()
    # writes: step1.ckpt, last.ckpt, step2.ckpt, then last.ckpt again: killed half-way through the 4th
    result = run_main_py(MIXTURE + ["--trainer.max_steps=4"] + every_step_checkpoints(tmp_path, "ckpt")
                         + [callback("tests.run_safety_helpers.KillDuringSave", nth=4)], tmp_path, TMPDIR=str(tmpdir))
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert checkpoint_step(tmp_path / "ckpt/last.ckpt") == 1  # the previous last.ckpt, whole
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last.ckpt", "step1.ckpt", "step2.ckpt"]
    assert list(tmpdir.iterdir()) == []


def test_a_temporary_left_by_a_dead_writer_is_removed_by_the_next_save(tmp_path, monkeypatch):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = tmp_path / f"{TMP_PREFIX}{dead.pid}-last.ckpt"
    live = tmp_path / f"{TMP_PREFIX}{os.getpid()}-other.ckpt"  # a writer still running: left alone
    orphan.write_bytes(b"partial")
    live.write_bytes(b"in progress")
    monkeypatch.delattr(os, "O_TMPFILE", raising=False)  # the named-temporary path
    atomic_write_bytes(b"complete", tmp_path / "last.ckpt")
    assert (tmp_path / "last.ckpt").read_bytes() == b"complete"
    assert not orphan.exists() and live.exists()


# ----------------------------------------------------------------------------- one clear message
def _error_of(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "Namespace(" not in err and "usage:" not in err and "Traceback" not in err
    return err[err.index("error: "):]


def test_missing_paths_and_damaged_checkpoints_give_one_message_naming_the_path(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    quick = ["fit", "--config", str(ROOT / "configs/quickstart.yaml"), *TINY, "--trainer.max_steps=1", *QUIET]
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "truncated.ckpt").write_bytes((ROOT / "tests/fixtures/pre_restructure/moe_tuning.ckpt").read_bytes()[:4000])
    cases = {
        "--data.init_args.root=/nowhere/shapes": "/nowhere/shapes",
        "--data.init_args.tokenizer=/nowhere/tok": "/nowhere/tok",
        "--model.init_args.backbone.pretrained=/nowhere/stage1/model": "/nowhere/stage1/model",
        "--data.init_args.domains={a: {train: missing.jsonl}}": "missing.jsonl",
        "--ckpt_path=/nowhere/last.ckpt": "/nowhere/last.ckpt",
        f"--ckpt_path={tmp_path / 'empty.ckpt'}": "empty.ckpt is empty",
        f"--ckpt_path={tmp_path / 'truncated.ckpt'}": "truncated.ckpt is truncated",
    }
    for arg, expected in cases.items():
        message = _error_of(quick + [arg], capsys)
        assert expected in message, (arg, message)
        assert len(message.splitlines()) <= 2, message  # the message and the --debug hint


def test_config_typo_is_one_line_without_the_usage_dump(tmp_path, capsys):
    typo = tmp_path / "typo.yaml"
    typo.write_text("trainer:\n  max_stepz: 3\n")
    message = _error_of(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--config", str(typo)], capsys)
    assert "max_stepz" in message
    message = _error_of(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--trainer.max_stepz=3"], capsys)
    assert "max_stepz" in message


def test_debug_flag_keeps_the_exception_and_its_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Exception) as raised:
        main(["fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--data.init_args.root=/nowhere", "--debug"])
    assert "/nowhere" in str(raised.value) and raised.tb is not None


def test_no_logger_writes_no_config_yaml_into_the_working_directory(one_thread):
    main(MIXTURE + ["--trainer.max_steps=1", "--trainer.logger=false", "--trainer.callbacks=[]"])
    assert not (one_thread / "config.yaml").exists()


def test_the_guard_refuses_to_write_a_checkpoint_with_non_finite_weights():
    from types import SimpleNamespace

    from lightning_moe.callbacks import NonFiniteError, NonFiniteGuard

    guard, trainer = NonFiniteGuard(), SimpleNamespace(global_step=5)
    with pytest.raises(NonFiniteError, match="model.w"):
        guard.on_save_checkpoint(trainer, None, {"state_dict": {"model.b": torch.ones(2), "model.w": torch.tensor([1.0, float("inf")])}})
    guard.on_save_checkpoint(trainer, None, {"state_dict": {"model.w": torch.ones(2), "step": torch.tensor(3)}})

"""What a user sees when a run cannot go on, through the commands as they are typed (`python main.py ...`,
`python -m lightning_moe.edge ...` in a subprocess): one line naming the key, file or record at fault, exit
status 1, no traceback. A wrong-type or impossible config value (on the command line or in a config file; an
impossible `moe` value before the model is built), a disk that fills up while a checkpoint is written, an expert
store with damaged files.

Each case stops before training, or after one or two steps of the tiny quickstart model.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from lightning_moe.callbacks.checkpoint_io import TMP_PREFIX
from tests.conftest import ROOT, TOKENIZER
from tests.test_run_safety import MIXTURE, callback, every_step_checkpoints, run_main_py

QUICKSTART = ["fit", "--config", str(ROOT / "configs/quickstart.yaml")]


def one_line_error(done: subprocess.CompletedProcess, prefix: str = "error: ") -> str:
    """The error line of a command that failed as it should: status 1, no traceback, one line (and --debug's hint)."""
    assert done.returncode == 1, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "Namespace(" not in done.stderr, done.stderr[-3000:]
    lines = done.stderr[done.stderr.index(prefix):].strip().splitlines()
    assert len(lines) <= 2 and (len(lines) == 1 or lines[1].startswith("(run again with --debug")), lines
    return lines[0]


@pytest.mark.parametrize("arguments, config, words", [
    (["--data.batch_size", "four"], "", "data.init_args.batch_size: expected int, got 'four'"),
    ([], "trainer:\n  max_steps: four\n", "trainer.max_steps: expected int, got 'four'"),
    (["--data.init_args.batch_size=-3"], "", "batch_size must be an integer >= 1, got -3"),
], ids=["type-on-command-line", "type-in-config-file", "impossible-value"])
def test_a_bad_config_value_is_one_line_naming_the_key(tmp_path, arguments, config, words):
    extra = []
    if config:
        (tmp_path / "mine.yaml").write_text(config)
        extra = ["--config", str(tmp_path / "mine.yaml")]
    line = one_line_error(run_main_py([*QUICKSTART, *extra, *arguments, "--trainer.logger=false"], tmp_path))
    assert line == f"error: {words}", line


@pytest.mark.parametrize("argument, words", [
    ("--model.init_args.moe.num_experts=four", "model.init_args.moe.num_experts: expected int, got 'four'"),
    ("--model.init_args.optimizer.init_args.lr=fast", "model.init_args.optimizer.init_args.lr: expected float, "
                                                      "got 'fast'"),
    ("--model.init_args.stage=upcycle", "model.init_args.stage: expected one of 'align', 'instruct', 'moe', got "
                                        "'upcycle'"),
    ("--data.init_args.skip_bad_records=maybe", "data.init_args.skip_bad_records: expected bool, got 'maybe'"),
    ("--trainer.max_steps=-5", "`max_steps` must be a non-negative integer or -1 (infinite steps). You passed in -5."),
], ids=["dataclass-field", "class-in-a-class", "choice", "bool", "trainer"])
def test_every_kind_of_key_is_named_in_full(tmp_path, monkeypatch, capsys, argument, words):
    """Nested keys (a dataclass field, a class's init_args inside a method's), a choice, a bool, and a trainer
    setting Lightning refuses (in process: the same `main` as the subprocesses above)."""
    from lightning_moe.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main([*QUICKSTART, argument, "--trainer.logger=false"])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err[err.index("error: "):].splitlines()[0] == f"error: {words}", err


@pytest.mark.parametrize("argument, words", [
    ("num_experts=-2", "moe.num_experts must be an integer >= 1, got -2"),
    ("top_k=5", "moe.top_k must be at most moe.num_experts (4), got 5"),
    ("top_k=0", "moe.top_k must be an integer >= 1, got 0"),
    ("capacity_factor=0", "moe.capacity_factor must be a finite number > 0, or null (dropless), got 0.0"),
    ("layers=5:2", "moe.layers '5:2' selects no decoder layer of any model"),
], ids=["experts", "top-k-above-experts", "top-k-zero", "capacity", "layers"])
def test_an_impossible_moe_value_is_one_line_before_the_model_is_built(tmp_path, monkeypatch, capsys, argument, words):
    """MoEConfig refuses it as the CLI builds the config (in process: the same `main` as the subprocesses above)."""
    from lightning_moe.cli import main
    from lightning_moe.methods import base

    def build_backbone(self):
        raise AssertionError(f"the model was built with {argument}")

    monkeypatch.setattr(base.MultimodalMethod, "build_backbone", build_backbone)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main([*QUICKSTART, f"--model.init_args.moe.{argument}", "--trainer.logger=false"])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err[err.index("error: "):].splitlines()[0] == f"error: {words}", err


def test_a_disk_that_fills_up_while_checkpointing_is_one_line_and_the_earlier_checkpoint_stays(tmp_path):
    # writes step1.ckpt, last.ckpt, step2.ckpt, then last.ckpt again: the disk is full half-way through that one
    done = run_main_py(MIXTURE + ["--trainer.max_steps=2", "--trainer.logger=false"]
                       + every_step_checkpoints(tmp_path, "ckpt")
                       + [callback("tests.run_safety_helpers.DiskFullDuringSave", nth=4)], tmp_path)
    line = one_line_error(done)
    last = tmp_path / "ckpt" / "last.ckpt"
    assert re.fullmatch(rf"error: checkpoint {re.escape(str(last))} \(\d+ bytes\) could not be written \(No space "
                        r"left on device\): the earlier last\.ckpt is kept unchanged; .*--ckpt_path", line), line
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 1  # whole, and the earlier one
    assert not list((tmp_path / "ckpt").glob(f"{TMP_PREFIX}*"))


def test_an_edge_command_on_a_damaged_store_is_one_line_naming_the_files(tmp_path, tokenizer):
    from lightning_moe.inference import export_store
    from tests.inference.conftest import make_sparse_model

    store = export_store(make_sparse_model(tokenizer), tmp_path / "store")
    names = sorted(e.file for e in store.entries.values())[:5]
    for name in names:
        (store.directory / name).write_bytes(b"")
    done = subprocess.run([sys.executable, "-m", "lightning_moe.edge", "generate", "--store", str(store.directory),
                           "--prompt", "How many shapes?", "--tokenizer", TOKENIZER], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    line = one_line_error(done, prefix="generate: ")
    assert line.startswith(f"generate: store {store.directory} has 5 damaged files: "), line
    assert all(f"{name} (truncated or altered)" in line for name in names[:3]) and "and 2 more" in line

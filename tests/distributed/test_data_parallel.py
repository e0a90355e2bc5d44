"""DDP and FSDP2 (Lightning's `ModelParallelStrategy`, configs/strategies/fsdp2.yaml) on 2 CPU processes (gloo)
train the same weights as one process on the same global batch (why they should: tests/distributed/two_processes.py).
DDP: the quickstart (MoE), MoLE and MoD's sparse mimic stage, with tiny widths, their upstream stages replaced by
tiny saved models; this is also the check that every trainable parameter is used (DDP raises otherwise: CLIP's
`post_layernorm` once was). FSDP2: the quickstart, and its checkpoint is one ordinary file holding those weights.

`test_ddp_and_fsdp2_resume_mid_epoch_on_two_processes` (slow): a 2-process run that `max_steps` stops mid-epoch and
is resumed from its `last.ckpt` on the same 2 processes trains every later step on the samples, with the loss, of the
run that was not interrupted, on every rank, and ends with its weights bit for bit (data/sampler.py).

`test_mora_replicas_stay_identical_across_a_task_boundary_under_ddp` (slow): MoRA, whose second task adds ranks and
freezes the first's after DDP wrapped the model, ends its second task with the same trainable weights on both ranks
(the task loop rebuilds the DDP wrapper at each task; without that, each rank trained its new ranks alone).

`test_mora_resumes_mid_sequence_under_ddp` (slow): a MoRA run that `max_steps` stops one step into its second task,
resumed from its `last.ckpt` on the same 2 processes, trains the next step on the uninterrupted run's samples with
its loss on each rank, and ends with its weights on both ranks, bit for bit.

One launch of two processes serves both strategies (each rank runs the DDP runs, then the FSDP2 one: Lightning
keeps the process group between Trainers) and one single-process run per config serves as the reference of both:
the launch and the references are what cost time.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, TINY_LLM, tiny_encoders
from tests.distributed.two_processes import (COMMON, TINY, assert_trains_the_same, record_batches, recorded_batches,
                                             train_on_one_process, train_on_two_processes)

STRATEGIES = {
    "DDP": ["--trainer.strategy=ddp"],
    # its own logger name: runs/fsdp2/ holds its checkpoint alone
    "FSDP2": ["--config", str(ROOT / "configs/strategies/fsdp2.yaml"), "--trainer.logger.init_args.name=fsdp2"],
}
# (strategy, config) of each 2-process run, in the order the ranks run them
TWO_PROCESS_RUNS = [("DDP", "quickstart"), ("DDP", "mole"), ("DDP", "mod"), ("FSDP2", "quickstart")]


def runs(base: str, teacher: str) -> dict[str, list[str]]:
    """CLI arguments of each compared config (stage inputs point at tiny saved models: `base`, MoD's `teacher`)."""
    return {
        "quickstart": ["fit", "--config", str(ROOT / "configs/quickstart.yaml"), *TINY],
        "mole": ["fit", "--config", str(ROOT / "configs/mole/mole.yaml"),
                 f"--model.init_args.backbone.pretrained={base}",
                 "--model.init_args.lora.dropout=0.0"],  # dropout draws differ between 1 and 2 processes
        "mod": ["fit", "--config", str(ROOT / "configs/mod/mimic_sparse.yaml"), f"--model.init_args.teacher={teacher}",
                f"--model.init_args.backbone.pretrained={base}"],
    }


def _save_tiny_model(tokenizer, path: Path, seed: int) -> str:
    from lightning_moe.models import build_multimodal

    torch.manual_seed(seed)
    build_multimodal(tokenizer, "tiny-llama", TINY_LLM, tiny_encoders(-1)).save_pretrained(path)
    return str(path)


@pytest.mark.slow  # two extra Python processes (imports, gloo), 4 runs on them, 3 references: 40-90 s on 2 cores
def test_ddp_and_fsdp2_on_two_cpu_processes_match_one_process_on_the_same_global_batch(
        tokenizer, tmp_path, monkeypatch, subtests):
    # MoD's teacher differs from the student it distils into: a teacher equal to the (upcycled) student gives a KL
    # gradient of rounding noise, whose signs AdamW's first step turns into +-lr, a comparison of summation orders
    configs = runs(_save_tiny_model(tokenizer, tmp_path / "base", 0),
                   _save_tiny_model(tokenizer, tmp_path / "teacher", 1))
    two = [configs[config] + STRATEGIES[strategy] + COMMON + ["--trainer.devices=2"]
           for strategy, config in TWO_PROCESS_RUNS]
    train_on_two_processes(two, tmp_path / "two", tmp_path)
    multi = {run: torch.load(tmp_path / "two" / f"{i}.pt") for i, run in enumerate(TWO_PROCESS_RUNS)}

    # `save_distributed_checkpoint: false`: FSDP2's last checkpoint is one file with the whole (gathered) model
    with subtests.test(msg="quickstart with FSDP2: last.ckpt"):
        checkpoints = list((tmp_path / "runs" / "fsdp2").rglob("last.ckpt"))
        assert len(checkpoints) == 1 and checkpoints[0].is_file(), f"FSDP2: not one last.ckpt file: {checkpoints}"
        saved = torch.load(checkpoints[0], weights_only=False)["state_dict"]
        for name, value in multi["FSDP2", "quickstart"]["state"].items():
            torch.testing.assert_close(saved[name], value, msg=lambda m: f"FSDP2 last.ckpt, quickstart: {name}: {m}")

    monkeypatch.chdir(tmp_path)
    for config, args in configs.items():
        single = train_on_one_process(args)  # one reference per config, for every strategy that ran it
        for strategy in [strategy for strategy, run_config in TWO_PROCESS_RUNS if run_config == config]:
            with subtests.test(msg=f"{config} with {strategy}"):
                assert_trains_the_same(multi[strategy, config], single, f"{config} with {strategy}")


@pytest.mark.slow  # six 2-process runs of the quickstart in one launch: 1-2 min on 2 cores
def test_ddp_and_fsdp2_resume_mid_epoch_on_two_processes(tmp_path, subtests):
    # 12 samples, 2 per rank: 3 steps per epoch; the stopped run's last.ckpt is written after step 2, mid-epoch 0,
    # once Lightning has counted that epoch as processed; the resumed run ends epoch 0 and trains all of epoch 1
    def run(strategy: str, name: str, steps: int, *extra: str) -> list[str]:
        return ["fit", "--config", str(ROOT / "configs/quickstart.yaml"), *TINY, *STRATEGIES[strategy], *COMMON,
                "--trainer.devices=2", f"--trainer.logger.init_args.name={strategy}_{name}",
                f"--trainer.max_steps={steps}", "--data.init_args.samples_per_epoch=12",
                *record_batches(tmp_path / f"{strategy}_{name}"), *extra]

    def checkpoint(strategy: str) -> Path:
        return tmp_path / "runs" / f"{strategy}_stopped" / "version_0" / "checkpoints" / "last.ckpt"

    runs = [run(strategy, name, steps, *extra) for strategy in STRATEGIES for name, steps, extra in (
        ("stopped", 2, ()), ("resumed", 5, (f"--ckpt_path={checkpoint(strategy)}",)), ("uninterrupted", 5, ()))]
    train_on_two_processes(runs, tmp_path / "two", tmp_path)
    for s, strategy in enumerate(STRATEGIES):
        with subtests.test(msg=f"{strategy}: the stopped run's checkpoint is mid-epoch"):
            loops = torch.load(checkpoint(strategy), weights_only=False)["loops"]["fit_loop"]
            assert loops["state_dict"]["combined_loader"] == [{"epoch": 0, "batches": 2, "length": 3, "num_replicas": 2}]
        resumed, uninterrupted = (recorded_batches(tmp_path / f"{strategy}_{name}") for name in ("resumed", "uninterrupted"))
        for rank in (0, 1):
            with subtests.test(msg=f"{strategy}, rank {rank}: the resumed steps' samples and losses"):
                assert sorted(resumed[rank]) == [2, 3, 4]
                for step, trained in resumed[rank].items():
                    assert trained == uninterrupted[rank][step], f"{strategy}, rank {rank}, step {step}"
        with subtests.test(msg=f"{strategy}: the resumed run's weights"):
            resumed, uninterrupted = (torch.load(tmp_path / "two" / f"{3 * s + i}.pt") for i in (1, 2))
            assert resumed["global_step"] == uninterrupted["global_step"] == 5
            different = [name for name, value in uninterrupted["state"].items()
                         if not torch.equal(resumed["state"][name], value)]
            assert not different, f"{strategy}: {len(different)} tensors differ, e.g. {different[:3]}"


@pytest.mark.slow  # two extra Python processes, one tiny 2-task run on them: 30-60 s on 2 cores
def test_mora_replicas_stay_identical_across_a_task_boundary_under_ddp(tokenizer, tmp_path):
    # MoRA adds the second task's ranks and freezes the first's when the task starts, after DDP wrapped the model:
    # unless the wrapper is rebuilt, the new ranks' gradients are not averaged and each rank trains its own
    mora = ["fit", "--config", str(ROOT / "configs/mora/continual.yaml"), "--trainer.strategy=ddp",
            "--trainer.devices=2", "--trainer.max_epochs=2", "--trainer.limit_val_batches=0",
            "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--data.init_args.order=[count, position_lr]",
            # 4 batches of 2 per task over 2 ranks: 2 optimizer steps per task
            "--data.init_args.steps_per_task=4", "--data.init_args.batch_size=2",
            f"--model.init_args.backbone.pretrained={_save_tiny_model(tokenizer, tmp_path / 'base', 0)}"]
    train_on_two_processes([mora], tmp_path / "two", tmp_path)
    rank0, rank1 = (torch.load(tmp_path / "two" / name) for name in ("0.pt", "0.rank1.pt"))
    assert rank0["global_step"] == rank1["global_step"] == 4
    assert all(".lora_A.1" in name or ".lora_B.1" in name for name in rank0["state"]), "only task 1's ranks train"
    different = [name for name, value in rank0["state"].items() if not torch.equal(rank1["state"][name], value)]
    gap = max((rank0["state"][name] - rank1["state"][name]).abs().max().item() for name in rank0["state"])
    assert not different, f"{len(different)} of {len(rank0['state'])} trainable tensors differ between the ranks " \
                          f"(largest difference {gap:.3g}), e.g. {different[:3]}"


LEAVE = """
import sys
import torch.distributed as dist
from lightning_moe.cli import leave_process_group_and_exit
if sys.argv[1] == "group":
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
print("written", end="")
leave_process_group_and_exit()
print(" after", end="")
sys.exit(3)
"""


@pytest.mark.parametrize("group", ["group", "none"])
def test_leaving_the_process_group_exits_at_once_with_the_output_flushed_and_without_a_group_returns(group):
    """A distributed process's last call destroys the group and exits with status 0 at once (the interpreter's
    finalisation, where gloo's threads have aborted finished ranks, never runs), its buffered output written;
    without a process group (a plain `main.py` run) it returns and the program goes on."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", LEAVE, group], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    if group == "group":
        assert (done.returncode, done.stdout) == (0, "written"), done.stderr
    else:
        assert (done.returncode, done.stdout) == (3, "written after"), done.stderr


@pytest.mark.slow  # two extra Python processes, three tiny 2-task MoRA runs on them: about a minute on 2 cores
def test_mora_resumes_mid_sequence_under_ddp(tokenizer, tmp_path, subtests):
    # 2 optimizer steps per task; `max_steps=3` stops the run one step into task 1, after MoRA added that task's
    # ranks and DDP was rewrapped around them. Resumed from its last.ckpt on the same 2 processes, the run must add
    # the ranks again before loading them, train step 3 on the uninterrupted run's samples with its loss, on each
    # rank, and end with its weights on both ranks
    base = _save_tiny_model(tokenizer, tmp_path / "base", 0)

    def run(name: str, steps: int, *extra: str) -> list[str]:
        return ["fit", "--config", str(ROOT / "configs/mora/continual.yaml"), "--trainer.strategy=ddp",
                "--trainer.devices=2", "--trainer.max_epochs=2", f"--trainer.max_steps={steps}",
                "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
                "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
                f"--trainer.logger.init_args.name=mora_{name}", "--data.init_args.order=[count, position_lr]",
                "--data.init_args.steps_per_task=4", "--data.init_args.batch_size=2",
                "--trainer.callbacks+=" + json.dumps({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                                      "init_args": {"dirpath": str(tmp_path / name), "every_n_train_steps": 1,
                                                                    "save_last": True, "save_top_k": 0}}),
                f"--model.init_args.backbone.pretrained={base}", *record_batches(tmp_path / f"{name}_batches"),
                *extra]

    stopped = tmp_path / "stopped" / "last.ckpt"
    train_on_two_processes([run("stopped", 3), run("resumed", 4, f"--ckpt_path={stopped}"), run("uninterrupted", 4)],
                           tmp_path / "two", tmp_path)
    with subtests.test(msg="the stopped run's checkpoint is one step into task 1"):
        checkpoint = torch.load(stopped, weights_only=False)
        assert checkpoint["global_step"] == 3 and checkpoint["epoch"] == 1
    resumed, uninterrupted = (recorded_batches(tmp_path / f"{name}_batches") for name in ("resumed", "uninterrupted"))
    for rank in (0, 1):
        with subtests.test(msg=f"rank {rank}: the resumed step's samples and loss"):
            assert sorted(resumed[rank]) == [3] and resumed[rank][3] == uninterrupted[rank][3]
    for rank, suffix in ((0, ""), (1, ".rank1")):
        with subtests.test(msg=f"rank {rank}: the resumed run's weights"):
            ended, reference = (torch.load(tmp_path / "two" / f"{i}{suffix}.pt") for i in (1, 2))
            assert ended["global_step"] == reference["global_step"] == 4
            assert ended["state"].keys() == reference["state"].keys()
            assert any(".lora_A.1" in name for name in ended["state"]), "task 1's ranks train"
            different = [name for name, value in reference["state"].items() if not torch.equal(ended["state"][name], value)]
            assert not different, f"rank {rank}: {len(different)} tensors differ, e.g. {different[:3]}"

"""Resuming a continual run from a checkpoint through Lightning's own path (`trainer.fit(ckpt_path=...)`):
a run stopped after task 0 and resumed from that task's checkpoint ends with the same accuracy matrix
and bit-identical adapters as the uninterrupted run (MoRA, whose module grows per task, and the
task-specific LoRA oracle, whose earlier tasks' LoRAs live outside the state dict), and so does one that
`max_steps` stopped in the middle or at the end of a task, resumed from the checkpoint written then with a larger
`max_steps` or none; a checkpoint of another task sequence, one not written by a continual method, or one written
between a task's last step and its evaluation is refused with a clear error; every
method's config dataclass reads back with `torch.load(weights_only=True)`, the default of Lightning's resume."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_moe.data import ContinualDataModule
from lightning_moe.methods import ContinualLoRA, MoRAContinual, MoRAOptions, base, distill, lora, mole, mora
from lightning_moe.models import MoEConfig
from tests.conftest import TOKENIZER
from tests.methods.test_mora import TASKS, make, shapes  # noqa: F401  (shapes: the module's data fixture)


def trainer_and_data(shapes: Path, root: Path, tasks: list[str] = TASKS, max_steps: int = -1,
                     callbacks: tuple[L.Callback, ...] = ()) -> tuple[L.Trainer, ContinualDataModule]:
    data = ContinualDataModule(order=tasks, root=str(shapes), tokenizer=TOKENIZER, steps_per_task=3,
                               batch_size=4, eval_batch_size=6)
    # one checkpoint per task, written after the task's evaluation (as configs/mora/continual.yaml), and last.ckpt
    checkpoints = ModelCheckpoint(dirpath=root / "checkpoints", filename="task{epoch}", save_top_k=-1,
                                  auto_insert_metric_name=False, save_last=True)
    trainer = L.Trainer(max_epochs=len(tasks), max_steps=max_steps, reload_dataloaders_every_n_epochs=1,
                        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=[checkpoints, *callbacks], default_root_dir=root)
    return trainer, data


class TrainedSteps(L.Callback):
    """Per training step: the global step, Lightning's epoch, the task trained and the batch's sample ids."""

    def __init__(self):
        self.steps: list[tuple[int, int, int, tuple[str, ...]]] = []

    def on_train_batch_end(self, trainer, method, outputs, batch, batch_idx):
        self.steps.append((trainer.global_step - 1, trainer.current_epoch, method.task_loop.current_task,
                           tuple(batch["id"])))


def adapters(method) -> dict[str, torch.Tensor]:
    return {n: method.model.get_parameter(n).detach().clone() for n in method.adapter_names()}


@pytest.mark.parametrize("method_kwargs", [
    {"cls": MoRAContinual, "mora": MoRAOptions(temperature=0.5, top_k=5, threshold=None, ranks_per_task=3)},
    {"cls": ContinualLoRA, "strategy": "task_specific"},
], ids=["mora", "lora_task_specific"])
def test_resumed_run_ends_exactly_as_the_uninterrupted_run(shapes, tmp_path, method_kwargs):  # noqa: F811
    kwargs = dict(method_kwargs)
    cls = kwargs.pop("cls")
    torch.manual_seed(0)
    full = make(cls, **kwargs)
    trainer, data = trainer_and_data(shapes, tmp_path / "full")
    trainer.fit(full, data)
    after_task0 = tmp_path / "full/checkpoints/task0.ckpt"  # the run "stopped" here
    assert after_task0.is_file()

    torch.manual_seed(123)  # a different random state at start: the checkpoint's must take over
    resumed = make(cls, **kwargs)
    trainer, data = trainer_and_data(shapes, tmp_path / "resumed")
    trainer.fit(resumed, data, ckpt_path=after_task0)
    assert trainer.current_epoch == len(TASKS) and trainer.global_step == 3 * len(TASKS)

    matrix = full.task_loop.accuracy.matrix()
    assert matrix.shape == (2, 2)
    torch.testing.assert_close(resumed.task_loop.accuracy.matrix(), matrix, rtol=0, atol=0)
    before, after = adapters(full), adapters(resumed)
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name
    assert any(v.abs().sum() > 0 for n, v in after.items() if "lora_B" in n)  # the adapters did train
    if cls is MoRAContinual:
        assert [a.shape[0] for a in resumed.mora_layers[0].lora_A] == [4, 3]
        assert resumed.model.surgery == full.model.surgery
    else:  # task 0's LoRA, kept outside the state dict, came back from the checkpoint
        assert set(resumed._bank) == {0}
        for name, value in full._bank[0].items():
            assert torch.equal(resumed._bank[0][name], value)


MORA = MoRAOptions(temperature=0.5, top_k=5, threshold=None, ranks_per_task=3)


@pytest.fixture(scope="module")
def uninterrupted(shapes, tmp_path_factory):  # noqa: F811
    """A MoRA run of the 2 x 3 steps, its trained steps, and its checkpoint written after step 3 (the last of
    task 0, before task 0's evaluation) by `every_n_train_steps`."""
    root, seen = tmp_path_factory.mktemp("uninterrupted"), TrainedSteps()
    after_steps = ModelCheckpoint(dirpath=root / "steps", filename="step{step}", every_n_train_steps=3,
                                  save_top_k=-1, auto_insert_metric_name=False)
    method = make(MoRAContinual, mora=MORA)
    trainer, data = trainer_and_data(shapes, root, callbacks=(seen, after_steps))
    trainer.fit(method, data)
    assert [(step, epoch, task) for step, epoch, task, _ in seen.steps] == [
        (0, 0, 0), (1, 0, 0), (2, 0, 0), (3, 1, 1), (4, 1, 1), (5, 1, 1)]
    return method, seen.steps, root / "steps/step3.ckpt"


@pytest.mark.parametrize("stop", [2, 3], ids=["mid_task", "at_task_end"])
def test_a_run_stopped_by_max_steps_resumes_exactly(shapes, tmp_path, uninterrupted, stop):  # noqa: F811
    # max_steps=2 stops the run after the second of task 0's three steps, max_steps=3 after its last; Lightning ends
    # the epoch either way, and writes last.ckpt (and task0.ckpt) at that end. Resumed with a larger max_steps or
    # none, the run trains the rest of task 0, if any, then task 1, step for step as the uninterrupted run.
    full, full_steps, _ = uninterrupted
    trainer, data = trainer_and_data(shapes, tmp_path / "stopped", max_steps=stop)
    trainer.fit(make(MoRAContinual, mora=MORA), data)
    stopped = tmp_path / "stopped/checkpoints/last.ckpt"
    assert torch.load(stopped, weights_only=False)["global_step"] == stop

    for max_steps in (6, -1):
        torch.manual_seed(123)
        resumed, seen = make(MoRAContinual, mora=MORA), TrainedSteps()
        trainer, data = trainer_and_data(shapes, tmp_path / f"resumed{max_steps}", max_steps=max_steps,
                                         callbacks=(seen,))
        trainer.fit(resumed, data, ckpt_path=stopped)
        assert seen.steps == full_steps[stop:], max_steps  # the same task, epoch and samples at every step
        assert trainer.current_epoch == len(TASKS) and trainer.global_step == 3 * len(TASKS)
        torch.testing.assert_close(resumed.task_loop.accuracy.matrix(), full.task_loop.accuracy.matrix(),
                                   rtol=0, atol=0)
        before, after = adapters(full), adapters(resumed)
        assert before.keys() == after.keys()
        for name in before:
            assert torch.equal(before[name], after[name]), (max_steps, name)


def test_a_checkpoint_between_a_tasks_last_step_and_its_evaluation_is_refused(  # noqa: F811
        shapes, tmp_path, uninterrupted):
    # Lightning would resume it in task 1 without task 0's evaluation: the message names the file, task and step
    after_last_step = uninterrupted[2]
    trainer, data = trainer_and_data(shapes, tmp_path)
    with pytest.raises(ValueError, match=r"step3.ckpt was written after the last step of task 0 "
                                         r"\(count, global step 3\).*resume from .*task0.ckpt.* or from one "
                                         r"written after an earlier step"):
        trainer.fit(make(MoRAContinual, mora=MORA), data, ckpt_path=after_last_step)


def test_resume_refuses_a_checkpoint_of_another_task_sequence(shapes, tmp_path):  # noqa: F811
    options = MoRAOptions(temperature=0.5, top_k=5, threshold=None, ranks_per_task=3)
    trainer, data = trainer_and_data(shapes, tmp_path / "a", tasks=["count"])
    trainer.fit(make(MoRAContinual, mora=options), data)
    trainer, data = trainer_and_data(shapes, tmp_path / "b", tasks=["position_lr"])
    with pytest.raises(ValueError, match=r"task sequence \['count'\].*\['position_lr'\]"):
        trainer.fit(make(MoRAContinual, mora=options), data, ckpt_path=tmp_path / "a/checkpoints/task0.ckpt")
    # a checkpoint without the task loop's state (here: the key removed) is refused, naming the file
    checkpoint = torch.load(tmp_path / "a/checkpoints/task0.ckpt", weights_only=False)
    del checkpoint["continual"]
    torch.save(checkpoint, tmp_path / "plain.ckpt")
    trainer, data = trainer_and_data(shapes, tmp_path / "c", tasks=["count"])
    with pytest.raises(ValueError, match="plain.ckpt has no 'continual' state"):
        trainer.fit(make(MoRAContinual, mora=options), data, ckpt_path=tmp_path / "plain.ckpt")


@pytest.mark.parametrize("config", [base.BackboneConfig(llm="x"), base.AuxLossConfig(coef=0.5), MoEConfig(num_experts=3),
                                    lora.LoRAOptions(r=2), mora.MoRAOptions(alpha=3.0), mole.ExpertOptions(),
                                    distill.MimicConfig(), distill.PreferenceConfig()], ids=lambda c: type(c).__name__)
def test_method_configs_read_back_with_weights_only_loading(tmp_path, config):
    # they sit in a checkpoint's hyper_parameters; torch refuses unknown classes under weights_only=True
    torch.save({"hyper_parameters": {"config": config}}, tmp_path / "h.ckpt")
    assert torch.load(tmp_path / "h.ckpt", weights_only=True)["hyper_parameters"]["config"] == config

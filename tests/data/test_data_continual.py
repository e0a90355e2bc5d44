"""ContinualDataModule: task order, one task per epoch (or all, joint), every task's test loader."""

from __future__ import annotations

import lightning as L
import pytest

from lightning_moe.data.continual import ContinualDataModule, TaskSpec


def _module(tiny_shapes, tokenizer, **kw):
    kw.setdefault("batch_size", 4)
    return ContinualDataModule(root=str(tiny_shapes), tokenizer=tokenizer.name_or_path, **kw)


class _Epoch:
    """Stands in for the trainer: the data module reads only `current_epoch`."""

    def __init__(self, epoch: int, max_epochs: int = 3, reload: int = 1):
        self.current_epoch, self.max_epochs, self.reload_dataloaders_every_n_epochs = epoch, max_epochs, reload


def test_default_sequence_is_the_shipped_domains_in_the_given_order(tiny_shapes, tokenizer):
    every = _module(tiny_shapes, tokenizer)
    assert every.task_names == ["colour", "count", "pope", "position_lr", "position_tb"]
    dm = _module(tiny_shapes, tokenizer, order=["position_tb", "count"])
    assert dm.task_names == ["position_tb", "count"]
    with pytest.raises(ValueError, match="not found under"):
        _module(tiny_shapes, tokenizer, order=["nope"])


def test_each_epoch_trains_only_its_task_and_evaluation_sees_every_task(tiny_shapes, tokenizer):
    dm = _module(tiny_shapes, tokenizer, order=["count", "position_lr", "position_tb"], steps_per_task=3)
    dm.setup("fit")
    for epoch, task in enumerate(dm.task_names):
        dm.trainer = _Epoch(epoch)
        batches = list(dm.train_dataloader())
        assert len(batches) == 3  # steps_per_task
        assert {d for b in batches for d in b["domain"]} == {task}
    loaders = dm.val_dataloader()
    assert [next(iter(loader))["domain"][0] for loader in loaders] == dm.task_names
    # evaluation reads the test files (ids name the split)
    assert all(i.split("-")[-2] == "test" for b in loaders[0] for i in b["id"])
    assert list(dm.task_test_dataloaders()) == dm.task_names


def test_evaluate_on_val_fills_the_matrix_from_the_val_files(tiny_shapes, tokenizer):
    # a setting chosen on the accuracy matrix must not see the test split the results report
    dm = _module(tiny_shapes, tokenizer, order=["count", "position_lr"], evaluate_on="val")
    dm.setup("fit")
    for loaders in (dm.val_dataloader(), list(dm.task_test_dataloaders().values())):
        assert [next(iter(loader))["domain"][0] for loader in loaders] == dm.task_names
        assert {i.split("-")[-2] for loader in loaders for b in loader for i in b["id"]} == {"val"}
    with pytest.raises(ValueError, match=r"needs a val file for every task; none for \['a'\]"):
        _module(tiny_shapes, tokenizer, tasks=[TaskSpec("a", "count/train.jsonl", "count/test.jsonl")],
                evaluate_on="val")
    with pytest.raises(ValueError, match="evaluate_on must be 'test' or 'val'"):
        _module(tiny_shapes, tokenizer, evaluate_on="train")


def test_joint_schedule_mixes_all_tasks_every_epoch(tiny_shapes, tokenizer):
    L.seed_everything(0)
    dm = _module(tiny_shapes, tokenizer, order=["count", "position_lr"], steps_per_task=8, schedule="joint")
    dm.setup("fit")
    dm.trainer = _Epoch(0, max_epochs=2)
    domains = {d for b in dm.train_dataloader() for d in b["domain"]}
    assert domains == {"count", "position_lr"}


def test_any_llava_files_form_a_task_and_bad_settings_are_named(tiny_shapes, tokenizer):
    tasks = [TaskSpec("a", "count/train.jsonl", "count/test.jsonl"), {"name": "b", "train": "pope/train.jsonl",
                                                                      "test": "pope/test.jsonl"}]
    dm = _module(tiny_shapes, tokenizer, tasks=tasks)
    assert dm.task_names == ["a", "b"]
    with pytest.raises(ValueError, match="max_epochs to 2"):
        dm.check_trainer(_Epoch(0, max_epochs=5))
    with pytest.raises(ValueError, match="reload_dataloaders_every_n_epochs"):
        dm.check_trainer(_Epoch(0, max_epochs=2, reload=0))
    with pytest.raises(ValueError, match="unique"):
        _module(tiny_shapes, tokenizer, tasks=[tasks[0], tasks[0]])
    with pytest.raises(ValueError, match="schedule"):
        _module(tiny_shapes, tokenizer, schedule="random")

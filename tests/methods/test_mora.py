"""MoRAContinual and the continual baselines through the method and a real Trainer: earlier tasks'
ranks get no gradient and stay bit-identical while later tasks train; a MoRA layer of the adapted
model equals its definition written out in float64; active ranks respect the budget; the accuracy
matrix is filled row by row; the task-specific oracle evaluates each task with its own LoRA;
`mora.alpha` scales MoRA's ranks only; MoRA refuses a multi-process strategy other than DDP."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_moe.data import ContinualDataModule
from lightning_moe.data.synthetic import generate
from lightning_moe.layers import LoRALinear, MoRALinear
from lightning_moe.methods import BackboneConfig, ContinualLoRA, LoRAOptions, MoRAContinual, MoRAOptions
from lightning_moe.models import add_adapter_task
from tests.conftest import TINY_LLM, TOKENIZER, tiny_encoders

BACKBONE = BackboneConfig(llm_overrides=TINY_LLM, encoders=tiny_encoders(-1))
TASKS = ["count", "position_lr"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    generate(root, n_train=24, n_eval=6)
    return root


def make(cls, **kwargs):
    torch.manual_seed(0)
    kwargs.setdefault("lora", LoRAOptions(r=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj", "up_proj"]))
    return cls(tokenizer=TOKENIZER, backbone=BACKBONE, max_new_tokens=2,
               optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2), **kwargs)


def fit(method, shapes, tmp_path, callbacks=(), schedule="sequential", steps=3):
    data = ContinualDataModule(order=TASKS, root=str(shapes), tokenizer=TOKENIZER, steps_per_task=steps,
                               schedule=schedule, batch_size=4, eval_batch_size=6)
    trainer = L.Trainer(max_epochs=len(TASKS), reload_dataloaders_every_n_epochs=1, accelerator="cpu",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, callbacks=list(callbacks),
                        default_root_dir=tmp_path)
    trainer.fit(method, data)
    return trainer


class WatchTaskZero(L.Callback):
    """While task 1 trains: task 0's ranks have no gradient; only task 1's ranks are optimised."""

    def __init__(self):
        self.snapshot, self.backward_checks, self.trained_in_task0 = None, 0, False

    def on_train_batch_start(self, trainer, method, batch, batch_idx):
        if trainer.current_epoch == 1 and self.snapshot is None:
            layers = method.mora_layers
            self.trained_in_task0 = all(bool(m.lora_B[0].abs().sum() > 0) for m in layers)  # task 0 did train
            self.snapshot = [(m.lora_A[0].detach().clone(), m.lora_B[0].detach().clone()) for m in layers]
            optimised = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
            assert optimised == {id(p) for m in layers for p in (m.lora_A[1], m.lora_B[1])}

    def on_after_backward(self, trainer, method):
        if trainer.current_epoch == 1:
            for m in method.mora_layers:
                assert m.lora_A[0].grad is None and m.lora_B[0].grad is None
                assert m.lora_A[1].grad is not None and m.lora_B[1].grad is not None
            self.backward_checks += 1


def test_earlier_task_ranks_get_no_gradient_and_stay_bit_identical(shapes, tmp_path):
    method = make(MoRAContinual, mora=MoRAOptions(temperature=0.5, top_k=4, threshold=None, ranks_per_task=3))
    watch = WatchTaskZero()
    fit(method, shapes, tmp_path, [watch])
    assert watch.trained_in_task0 and watch.backward_checks == 3
    for m, (a0, b0) in zip(method.mora_layers, watch.snapshot):
        assert [a.shape[0] for a in m.lora_A] == [4, 3]  # task 0: lora.r, task 1: ranks_per_task
        assert torch.equal(m.lora_A[0], a0) and torch.equal(m.lora_B[0], b0)
        assert m.lora_B[1].abs().sum() > 0  # the new task's ranks did train
    assert method.model.surgery[-1] == {"op": "add_adapter_task", "r": 3}  # replayed by from_pretrained
    assert not any(p.requires_grad for n, p in method.model.named_parameters() if ".lora_" not in n)
    # the accuracy matrix has one row per task, every task evaluated after each task
    assert method.task_loop.accuracy.matrix().shape == (2, 2)
    # every evaluated task's active ranks are attributed to the two tasks' blocks, within the budget
    assert set(method.rank_usage) == set(TASKS)
    assert all(u.shape == (2,) and 0 < float(u.sum()) <= 4 for u in method.rank_usage.values())
    counts = method.adapter_parameter_counts()
    assert counts["ranks"] == 7 and counts["total"] == counts["per_task"] * 7 // 3


def test_mora_layer_with_full_budget_and_no_pruning_is_the_weighted_sum_of_rank1_updates():
    method = make(MoRAContinual, mora=MoRAOptions(temperature=0.7, top_k=None, threshold=None))
    add_adapter_task(method.model, 3)  # two tasks' ranks: 4 + 3
    layer = method.mora_layers[0]
    with torch.no_grad():
        for b in layer.lora_B:
            b.normal_()
    x = torch.randn(5, layer.base_layer.in_features)
    y = layer(x)
    A = torch.cat([a.double() for a in layer.lora_A])  # (R, in)
    B = torch.cat([b.double() for b in layer.lora_B], dim=1)  # (out, R)
    W, bias, xd, R = layer.base_layer.weight.double(), layer.base_layer.bias, x.double(), A.shape[0]
    for t in range(5):
        z = [A[i] @ xd[t] for i in range(R)]  # rank activations A_i x
        norm = torch.sqrt(sum(zi ** 2 for zi in z))
        e = [torch.exp(zi / norm / 0.7) for zi in z]
        w = [ei / sum(e) for ei in e]  # softmax(s / tau)
        delta = sum(w[i] * z[i] * B[:, i] for i in range(R))  # sum_i w_i B_i (A_i x)
        expected = W @ xd[t] + (0 if bias is None else bias.double()) + layer.scaling * delta
        torch.testing.assert_close(y[t].double(), expected, rtol=1e-5, atol=1e-6)
    assert layer.scaling == 8 / 4  # alpha / r of the first task, unchanged by the added ranks


@pytest.mark.parametrize(("top_k", "threshold"), [(3, None), (3, 0.0), (None, 0.2)])
def test_active_ranks_per_token_respect_the_budget(top_k, threshold):
    method = make(MoRAContinual, mora=MoRAOptions(top_k=top_k, threshold=threshold))
    add_adapter_task(method.model, 4)  # 8 ranks per layer
    ids = torch.randint(10, 40, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # padding is not counted
    method.model(input_ids=ids, attention_mask=mask)
    for layer in method.mora_layers:
        active = layer.last_active_ranks  # (B, T)
        assert active.shape == ids.shape
        assert int(active.max()) <= (top_k or 8)
        if threshold is None:
            assert torch.all(active == top_k)  # no pruning: exactly the budget
    if threshold is not None:
        layer = method.mora_layers[0]
        assert int(layer.last_active_ranks.min()) < (top_k or 8)  # pruning removes some ranks
    mean = method.mean_active_ranks(mask)
    expected = torch.stack([l.last_active_ranks[mask.bool()].float().mean() for l in method.mora_layers]).mean()
    assert torch.allclose(mean, expected) and mean <= (top_k or 8)


def test_task_specific_lora_evaluates_each_task_with_its_own_adapter(shapes, tmp_path):
    method = make(ContinualLoRA, strategy="task_specific")
    seen = {}

    class Record(L.Callback):
        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            # the weights this batch was evaluated with
            name = next(n for n in pl_module.adapter_names() if n.endswith("lora_B.weight"))
            seen[(trainer.current_epoch, batch["domain"][0])] = pl_module.model.get_parameter(name).detach().clone()

    fit(method, shapes, tmp_path, [Record()])
    # after task 1, task 0 is evaluated with task 0's LoRA (as it was after task 0), task 1 with task 1's
    assert torch.equal(seen[(1, "count")], seen[(0, "count")])
    assert not torch.equal(seen[(1, "position_lr")], seen[(1, "count")])
    assert torch.equal(seen[(0, "position_lr")], torch.zeros_like(seen[(0, "position_lr")]))  # untrained: B = 0
    name = next(n for n in method.adapter_names() if n.endswith("lora_B.weight"))
    assert torch.equal(method.model.get_parameter(name), seen[(1, "position_lr")])  # live weights restored
    with pytest.raises(ValueError, match="schedule"):
        fit(make(ContinualLoRA, strategy="joint"), shapes, tmp_path)


def test_mora_alpha_scales_only_the_rank1_experts():
    # mora.alpha sets MoRA's scaling; the `lora` options the LoRA baselines share keep their alpha
    mora = make(MoRAContinual, mora=MoRAOptions(alpha=32.0))
    assert {layer.scaling for layer in mora.mora_layers} == {32.0 / 4}
    assert {layer.scaling for layer in make(MoRAContinual).mora_layers} == {8 / 4}  # default: lora.alpha
    lora = make(ContinualLoRA)
    assert {m.scaling for m in lora.model.modules() if isinstance(m, LoRALinear)} == {8 / 4}


@pytest.mark.parametrize("method, refused", [(MoRAContinual, True), (ContinualLoRA, False)])
def test_a_method_that_changes_its_trainable_parameters_refuses_multi_process_strategies_other_than_ddp(
        method, refused):
    # DDP's wrapper is rebuilt at each task (tests/distributed/test_data_parallel.py); FSDP2 shards what it saw once
    from types import SimpleNamespace

    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_moe.methods.continual import TaskLoop

    fake = SimpleNamespace(changes_trainable_parameters=method.changes_trainable_parameters,
                           trainer=SimpleNamespace(world_size=2, strategy=ModelParallelStrategy()))
    if refused:
        with pytest.raises(ValueError, match="changes its trainable parameters.*one process or with trainer.strategy=ddp"):
            TaskLoop(fake)._check_strategy()
    else:
        TaskLoop(fake)._check_strategy()
    fake.trainer.world_size = 1
    TaskLoop(fake)._check_strategy()  # one process: nothing to keep in step

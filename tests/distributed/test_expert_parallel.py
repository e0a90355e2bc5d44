"""Expert parallelism (layers/expert_parallel.py, strategies.shard_experts, configs/strategies/ep.yaml) on 2 CPU
processes (gloo) computes what one process computes on the same global batch.

`test_expert_parallel_matches_one_process`: one launch of two processes (tests/distributed/ep_worker.py) for an
upcycled quickstart-sized model, a converted tiny Qwen2-MoE (shared expert, a dense layer between sparse ones)
and Uni-MoE's stage-3 layers (LoRA on every expert, split with the experts);
for each, expert parallelism alone and with FSDP2 on the other parameters give the one process's loss and
gradients (the routing losses are computed over the whole batch), and the gathered full state dict holds every
expert: loaded into one process it gives the expert-parallel logits.

`test_ep_strategy_trains_saves_and_resumes` (slow): the quickstart through the CLI with
configs/strategies/ep.yaml writes one ordinary `last.ckpt` with every expert, which `load_backbone` reads in one
process with the weights the expert-parallel run trained, and resuming it on the same 2 processes continues
bit for bit as the run that was not interrupted (weights, optimizer state and step restored into the expert
shards, the training loader's position restored mid-epoch: each rank trains on the uninterrupted run's samples).

Also: on a 1-process group the expert-parallel dispatch is the plain layer; the benchmark's expert-parallel row
(slow) checks its parity before timing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from lightning_moe.formats import load_backbone
from lightning_moe.models import MoEConfig, build_multimodal, expert_layers, upcycle
from tests.conftest import ROOT, TINY_LLM, tiny_encoders
from tests.distributed.two_processes import (COMMON, TINY, record_batches, recorded_batches, run_on_two_processes,
                                             train_on_two_processes)
from tests.models.test_native_moe import save_hf_moe

# float32 rounding, not bit-equality: each rank runs every layer on half the batch (matmuls over other row counts
# block their sums differently) and the gradients are summed over 2 ranks in another order; the weights gathered
# from the ranks are bit-identical (asserted), so one process computes bit-identical logits from the checkpoint
TOLERANCE = dict(rtol=1e-4, atol=1e-6)


def _global_batch(tokenizer, rows: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, len(tokenizer), (rows, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding in one rank's half only: the ranks train different numbers of tokens
    ids = ids.masked_fill(mask == 0, tokenizer.pad_token_id)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _upcycled(tokenizer, path) -> str:
    """The quickstart's model at test widths: tiny Llama, 4 experts top-2 on every other layer, tiny CLIP; the
    copies made to differ (identical experts would hide an expert given the wrong tokens)."""
    torch.manual_seed(0)
    model = build_multimodal(tokenizer, "tiny-llama", TINY_LLM, tiny_encoders(-1))
    upcycle(model, MoEConfig(num_experts=4, top_k=2, layers="::2"))
    with torch.no_grad():
        for _, moe in expert_layers(model):
            moe.router.proj.weight.normal_(std=0.5)
            moe.gate_up_proj.add_(torch.randn_like(moe.gate_up_proj) * 0.05)
            moe.down_proj.add_(torch.randn_like(moe.down_proj) * 0.05)
    model.save_pretrained(path)
    return str(path)


def _unimoe(tokenizer, path) -> str:
    """Uni-MoE's stage-3 layers: the upcycled model's experts under a LoRA update per expert ("moe_lora", its
    A and B split with the experts), LoRA on attention, the router trained beside them."""
    from lightning_moe.models import AdapterRule, add_adapters

    model = load_backbone(_upcycled(tokenizer, path / "upcycled"), tokenizer=tokenizer)
    add_adapters(model, [AdapterRule(kind="lora", targets=["q_proj", "v_proj"], r=2, alpha=4),
                         AdapterRule(kind="moe_lora", targets=["mlp"], layers="::2", r=2, alpha=4)])
    with torch.no_grad():  # B starts at zero, which would leave A without a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    model.save_pretrained(path / "unimoe")
    return str(path / "unimoe")


def _qwen2_moe(tokenizer, path) -> str:
    model = build_multimodal(tokenizer, llm=save_hf_moe("qwen2_moe", path / "hf", tokenizer), encoders={})
    assert any(moe.shared_expert is not None for _, moe in expert_layers(model))
    model.save_pretrained(path / "project")
    return str(path / "project")


def test_expert_parallel_matches_one_process(tokenizer, tmp_path, subtests):
    cases = {"upcycled": _upcycled(tokenizer, tmp_path / "upcycled"), "qwen2_moe": _qwen2_moe(tokenizer, tmp_path / "q2"),
             "unimoe": _unimoe(tokenizer, tmp_path / "unimoe")}
    batch = _global_batch(tokenizer)
    torch.save(batch, tmp_path / "batch.pt")
    run_on_two_processes("tests.distributed.ep_worker",
                         [str(tmp_path / "out.pt"), json.dumps(cases), str(tmp_path / "batch.pt")], tmp_path)
    results = torch.load(tmp_path / "out.pt", weights_only=False)
    for case, runs in results.items():
        one = runs["one process"]
        assert any(name.endswith(("mlp.down_proj", "lora_A.down")) for name in one["grads"]), case
        for variant in ("expert parallel", "expert parallel + FSDP2"):
            with subtests.test(msg=f"{case}, {variant}"):
                run = runs[variant]
                torch.testing.assert_close(run["loss"], one["loss"], **TOLERANCE)
                assert run["grads"].keys() == one["grads"].keys()
                for name, grad in one["grads"].items():
                    torch.testing.assert_close(run["grads"][name], grad, **TOLERANCE,
                                               msg=lambda m: f"{case}, {variant}: {name}: {m}")
        with subtests.test(msg=f"{case}: the gathered state dict"):
            saved = runs["expert parallel + FSDP2"]["state_dict"]
            assert saved.keys() == one["state_dict"].keys()
            for name, value in one["state_dict"].items():  # no step taken: exactly the weights it started from
                assert torch.equal(saved[name], value), name
            model = load_backbone(cases[case], tokenizer=tokenizer).train()
            model.load_state_dict(saved)
            with torch.no_grad():
                logits = model(**batch).logits
            torch.testing.assert_close(logits, runs["expert parallel + FSDP2"]["logits"], **TOLERANCE)


def test_one_process_group_is_the_plain_layer_and_a_dense_model_is_refused(tokenizer, monkeypatch):
    """On a 1-process gloo group the expert-parallel dispatch (its all-to-alls exchange nothing) computes the plain
    layer's output and gradients; a model without a SparseMoE has no experts to split, which is an error."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_moe.layers import SparseMoE
    from lightning_moe.strategies import shard_experts
    from tests.distributed.two_processes import _free_port

    torch.manual_seed(0)
    plain = torch.nn.Sequential(SparseMoE(16, 24, 4, 2, bias=True, shared_expert_size=8))
    split = torch.nn.Sequential(SparseMoE(16, 24, 4, 2, bias=True, shared_expert_size=8))
    split.load_state_dict(plain.state_dict())
    x = torch.randn(10, 16)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        assert len(shard_experts(split, mesh)) == 4  # gate_up_proj, down_proj and their biases
        assert split[0].expert_group is not None
        outs = [model(x) for model in (plain, split)]
        for out in outs:
            out.square().sum().backward()
        with pytest.raises(ValueError, match="no SparseMoE"):
            shard_experts(build_multimodal(tokenizer, "tiny-llama", TINY_LLM, encoders={}), mesh)
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(outs[1], outs[0])
    for (name, p), q in zip(plain.named_parameters(), split.parameters()):
        grad = q.grad.full_tensor() if hasattr(q.grad, "full_tensor") else q.grad
        torch.testing.assert_close(grad, p.grad, msg=lambda m: f"{name}: {m}")


@pytest.mark.slow  # three 2-process CLI runs of the quickstart: 1-3 min on 2 cores
def test_ep_strategy_trains_saves_and_resumes(tokenizer, tmp_path, subtests):
    # 16 samples, 2 per rank: 4 steps per epoch; the checkpoint after step 2 is mid-epoch 0, and the resumed run
    # goes on into epoch 1
    def run(name: str, steps: int, *extra: str) -> list[str]:
        return ["fit", "--config", str(ROOT / "configs/quickstart.yaml"), *TINY,
                "--config", str(ROOT / "configs/strategies/ep.yaml"), f"--trainer.logger.init_args.name={name}",
                *COMMON, f"--trainer.max_steps={steps}", "--data.init_args.samples_per_epoch=16",
                *record_batches(tmp_path / name), *extra]

    checkpoint = tmp_path / "runs" / "two_steps" / "version_0" / "checkpoints" / "last.ckpt"
    train_on_two_processes([run("two_steps", 2), run("resumed", 5, f"--ckpt_path={checkpoint}"), run("five_steps", 5)],
                           tmp_path / "two", tmp_path)
    two_steps, resumed, five_steps = (torch.load(tmp_path / "two" / f"{i}.pt") for i in range(3))

    with subtests.test(msg="last.ckpt: one file with every expert"):
        saved = torch.load(checkpoint, weights_only=False)["state_dict"]
        experts = [name for name in saved if name.endswith("mlp.gate_up_proj")]
        assert experts and all(saved[name].shape[0] == 4 for name in experts)
        for name, value in two_steps["state"].items():
            assert torch.equal(saved[name], value), name
    with subtests.test(msg="load_backbone reads it in one process"):
        model = load_backbone(checkpoint, tokenizer=tokenizer)
        weights = dict(model.named_parameters())
        for name, value in two_steps["state"].items():
            assert torch.equal(weights[name.removeprefix("model.")], value), name
    with subtests.test(msg="resumed mid-epoch on the same mesh: the uninterrupted run's samples and losses"):
        assert torch.load(checkpoint, weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
            {"epoch": 0, "batches": 2, "length": 4, "num_replicas": 2}]
        trained, uninterrupted = recorded_batches(tmp_path / "resumed"), recorded_batches(tmp_path / "five_steps")
        for rank in (0, 1):
            assert sorted(trained[rank]) == [2, 3, 4]
            for step, batch in trained[rank].items():
                assert batch == uninterrupted[rank][step], f"rank {rank}, step {step}"
    with subtests.test(msg="resumed on the same mesh: the uninterrupted run's weights"):
        assert resumed["global_step"] == five_steps["global_step"] == 5
        for name, value in five_steps["state"].items():
            assert torch.equal(resumed["state"][name], value), name


@pytest.mark.slow  # two spawned processes import the benchmark's dependencies: 15-30 s on 2 cores
def test_benchmark_expert_parallel_row():
    """`benchmarks/moe_layer.py --expert-parallel --quick` checks the split layer against the whole one on the same
    weights before timing, and prints its row with the all-to-all bytes."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/moe_layer.py"), "--expert-parallel", "--quick"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "parity: ok" in done.stdout
    row = next(line for line in done.stdout.splitlines() if line.startswith("| 128 |"))
    assert float(row.split("|")[-2]) > 0  # MB sent per step: pairs whose expert is on the other process

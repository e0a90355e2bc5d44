"""One rank of the expert-parallel comparison (tests/distributed/test_expert_parallel.py), started by
`two_processes.run_on_two_processes`.

argv: OUT_FILE, then JSON {case name: saved model directory}, then the global batch's file. For every model, with
the same global batch: one process (rank 0 alone, no collective), expert parallelism over the 2 ranks with every
other parameter replicated (its gradients averaged over the ranks, as DDP would), and expert parallelism with
FSDP2 on every other parameter (`strategies.shard_experts`, then `shard_blocks`). Each rank takes its half of the
batch. Rank 0 writes, per case and variant, the loss (the mean over ranks of each rank's loss) and every
gradient gathered whole, and for the FSDP2 variant the full state dict and the logits of the whole batch as the
expert-parallel model computes them, to OUT_FILE.

Each rank's loss is built so that the data-parallel average of the ranks' losses (and gradients) is the one
process's: LM cross-entropy summed over the rank's trained tokens x ranks / the whole batch's trained tokens,
plus the routing losses, which expert parallelism computes over the whole batch (every rank the same value).
"""

import copy
import json
import sys

import torch
import torch.distributed as dist

from lightning_moe.cli import leave_process_group_and_exit
from lightning_moe.formats import load_backbone
from lightning_moe.layers import collect_routing, load_balancing_loss, router_z_loss
from lightning_moe.methods.base import causal_lm_loss
from lightning_moe.strategies import shard_blocks, shard_experts
from lightning_moe.tokens import load_tokenizer
from tests.conftest import TOKENIZER

RANKS = 2


def objective(model, batch: dict, ranks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's loss (module docstring) and the logits."""
    out = model(**batch)
    _, per_sample, counts = causal_lm_loss(out.logits, out.labels)
    trained = counts.sum()
    if ranks > 1:
        dist.all_reduce(trained)
    routing = collect_routing(model)
    mask = out.attention_mask.reshape(-1).bool()
    aux = load_balancing_loss(routing, mask, form="gshard") + router_z_loss(routing, mask)
    return per_sample.sum() * ranks / trained + 0.01 * aux, out.logits


def gathered(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().clone()


def expert_parallel(model, batch: dict, mesh, fsdp2: bool) -> dict:
    """Loss and whole gradients of the model trained expert-parallel on the rank's half of `batch`."""
    experts = shard_experts(model, mesh)
    if fsdp2:
        shard_blocks(model, mesh, ignored_params=experts)
    half = {key: value.chunk(RANKS)[dist.get_rank()] for key, value in batch.items()}
    loss, logits = objective(model, half, RANKS)
    loss.backward()
    if not fsdp2:  # DDP's average for the replicated parameters; the experts' gradients are averaged already
        for p in model.parameters():
            if p.grad is not None and p not in experts:
                dist.all_reduce(p.grad)
                p.grad /= RANKS
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    grads = {name: gathered(p.grad) for name, p in model.named_parameters() if p.grad is not None}
    result = {"loss": mean_loss / RANKS, "grads": grads}
    if fsdp2:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        result["state_dict"] = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                                   cpu_offload=True))
        with torch.no_grad():
            every = [torch.empty_like(logits) for _ in range(RANKS)]
            dist.all_gather(every, logits.contiguous())
        result["logits"] = torch.cat(every)
    return result


if __name__ == "__main__":
    out_file, cases, batch_file = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    dist.init_process_group("gloo")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (RANKS,), mesh_dim_names=("data_parallel",))
    tokenizer = load_tokenizer(TOKENIZER)
    batch = torch.load(batch_file)
    results = {}
    for name, path in cases.items():
        model = load_backbone(path, tokenizer=tokenizer).train()
        reference = copy.deepcopy(model)
        loss, _ = objective(reference, batch, 1)
        loss.backward()
        results[name] = {
            "one process": {"loss": loss.detach(),
                            "grads": {n: p.grad.clone() for n, p in reference.named_parameters() if p.grad is not None},
                            "state_dict": reference.state_dict()},
            "expert parallel": expert_parallel(copy.deepcopy(model), batch, mesh, fsdp2=False),
            "expert parallel + FSDP2": expert_parallel(copy.deepcopy(model), batch, mesh, fsdp2=True),
        }
    if dist.get_rank() == 0:
        torch.save(results, out_file)
    leave_process_group_and_exit()

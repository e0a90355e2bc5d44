"""One rank of a 2-process run (gloo, CPU; DDP or FSDP2), started by tests/distributed/two_processes.py as torchrun would.

Every rank gets RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT from the test, so Lightning's
environment knows the processes were created outside it and each `Trainer` joins the same process group (the
first creates it; Lightning neither destroys it at the end of a run nor creates another, so DDP and FSDP2 runs
follow one another in one launch). argv: OUT_DIR, then one JSON list of CLI argument lists, one run per entry;
rank 0 writes run i's trainable weights to OUT_DIR/i.pt, every other rank r to OUT_DIR/i.rank{r}.pt (replicas
under DDP must hold the same ones; FSDP2's sharded parameters gathered whole first, on every rank: the gather is a
collective).
"""

import json
import os
import sys
from pathlib import Path

import torch

from lightning_moe.cli import leave_process_group_and_exit, main

if __name__ == "__main__":
    out = Path(sys.argv[1])
    for i, args in enumerate(json.loads(sys.argv[2])):
        cli = main(args)
        # a DTensor (FSDP2 shard) is gathered whole on every rank
        state = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
                 for n, p in cli.model.named_parameters() if p.requires_grad}
        rank = int(os.environ["RANK"])
        torch.save({"state": state, "global_step": cli.trainer.global_step},
                   out / (f"{i}.pt" if rank == 0 else f"{i}.rank{rank}.pt"))
    leave_process_group_and_exit()

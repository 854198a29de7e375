"""One rank of the two-host test: meet across hosts through our launcher, train, checkpoint, report."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import launcher
from helpers import batch, loss_fn, make_net
from sharded_fused_adam import ShardedFusedAdam, save_sharded


def main() -> None:
    out = Path(sys.argv[1])
    device = launcher.init_distributed(timeout=60, rendezvous_timeout=60)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    model = make_net()
    opt = ShardedFusedAdam(model.parameters(), lr=1e-2, collective_timeout=30)
    losses = []
    for step in range(5):
        opt.zero_grad()
        loss = loss_fn(model, *batch(step, rank, same_on_all_ranks=False))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    save_sharded(opt, out / "ck")
    checksum = sum(p.double().sum().item() for p in model.parameters())
    (out / f"rank{rank}.json").write_text(json.dumps(dict(
        rank=rank, world_size=world_size, device=str(device), losses=losses, checksum=checksum,
        comm=opt.last_step_comm_bytes)))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

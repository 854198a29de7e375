"""One rank of the two-host test: meet across hosts through our launcher, train, checkpoint, report."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import launcher
from helpers import averaged_grads, batch, loss_fn, make_net
from sharded_fused_adam import ShardedFusedAdam, save_sharded


def main() -> None:
    out = Path(sys.argv[1])
    device = launcher.init_distributed(timeout=60, rendezvous_timeout=60)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    model = make_net()
    ref = copy.deepcopy(model)  # single-process torch Adam on the averaged gradients, beside us
    opt = ShardedFusedAdam(model.parameters(), lr=1e-2, collective_timeout=30)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2, fused=True)
    losses, parity = [], 0.0
    for step in range(5):
        opt.zero_grad()
        loss = loss_fn(model, *batch(step, rank, same_on_all_ranks=False))
        loss.backward()
        opt.step()
        losses.append(loss.item())
        everyone = [batch(step, r, same_on_all_ranks=False) for r in range(world_size)]
        for p, g in zip(ref.parameters(), averaged_grads(ref, everyone)):
            p.grad = g
        ref_opt.step()
        parity = max(parity, max((a - b).abs().max().item() for a, b in zip(model.parameters(), ref.parameters())))
    save_sharded(opt, out / "ck")
    checksum = sum(p.double().sum().item() for p in model.parameters())
    (out / f"rank{rank}.json").write_text(json.dumps(dict(
        rank=rank, world_size=world_size, device=str(device), losses=losses, checksum=checksum, parity=parity,
        comm=opt.last_step_comm_bytes)))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

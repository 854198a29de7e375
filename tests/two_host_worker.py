"""One rank of the two-host tests: meet across hosts through our launcher, train, report.

Modes (the second argument): ``checkpoint`` (the default) trains on the whole world, saves a
sharded checkpoint and checks parity with torch.optim.Adam beside itself; ``hybrid`` runs the
hybrid-sharding case of test_parallelism.py (a 2-D DeviceMesh, its oracle and its checks'
inputs) with and without ``max_grad_norm``, so the mesh's "shard" groups stay within a host
and its "replicate" groups cross the link between the hosts.
"""
from __future__ import annotations

import copy
import gc
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import launcher
from helpers import averaged_grads, batch, loss_fn, make_net
from sharded_fused_adam import ShardedFusedAdam, save_sharded


def _checkpoint(out: Path, rank: int, world_size: int) -> dict:
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
    return dict(losses=losses, checksum=checksum, parity=parity, comm=opt.last_step_comm_bytes)


def _hybrid(rank: int, world_size: int) -> dict:
    from test_parallelism import _hybrid as train_hybrid  # the 4-rank case and its oracle, unchanged

    return {"clip": train_hybrid(rank, world_size, True, ""), "no_clip": train_hybrid(rank, world_size, False, "")}


def main() -> None:
    out = Path(sys.argv[1])
    mode = sys.argv[2] if len(sys.argv) > 2 else "checkpoint"
    device = launcher.init_distributed(timeout=60, rendezvous_timeout=60)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    report = _hybrid(rank, world_size) if mode == "hybrid" else _checkpoint(out, rank, world_size)
    interface = os.environ.get("GLOO_SOCKET_IFNAME")  # which host (namespace) this rank ran on
    (out / f"rank{rank}.json").write_text(json.dumps(dict(rank=rank, world_size=world_size, device=str(device),
                                                          interface=interface, **report)))
    # Free the finished optimizers (and the mesh's groups they hold) before destroying the groups:
    # left to interpreter exit, a rank sometimes aborted there ("terminate called without an active
    # exception") after its report, and the other host's launcher waited out the exit barrier.
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Data-parallel training started by mpirun: ``launcher.init_distributed()`` reads the MPI environment.

    # Open MPI (as root add --allow-run-as-root; beyond the core count add --oversubscribe):
    mpirun -np 2 --allow-run-as-root python examples/mpirun/train_mpi.py --steps 5
    # MPICH / Intel MPI:
    mpiexec -n 2 python examples/mpirun/train_mpi.py --steps 5
    # several nodes: give a hostfile (see launcher/templates/mpirun_hostfile) and, where the
    # nodes cannot resolve each other's hostnames, -x MASTER_ADDR=<node 0's address>

Rank, world size and local rank come from ``OMPI_COMM_WORLD_*`` (or ``PMI_*``); rank 0
picks a rendezvous port and broadcasts it over MPI (mpi4py), and the training traffic then
goes through the usual backend (gloo here, hccl on Ascend, nccl on CUDA), not through MPI.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

import launcher
from sharded_fused_adam import ShardedFusedAdam


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    started_by = launcher.parse_env(os.environ).source      # before init, which exports RANK etc.
    device = launcher.init_distributed()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    print(f"rank {rank} of {world_size}: started by {started_by}, backend {dist.get_backend()}, "
          f"device {device}", flush=True)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 4)).to(device)
    opt = ShardedFusedAdam(model.parameters(), lr=3e-3, max_grad_norm=1.0)
    g = torch.Generator().manual_seed(rank)
    for step in range(args.steps):
        x = torch.randn(32, 16, generator=g).to(device)
        loss = nn.functional.mse_loss(model(x), x[:, :4].sin())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0:
            print(f"step {step}  loss (rank 0 batch) {loss.item():.4f}  "
                  f"global grad norm {opt.get_global_grad_norm():.4f}", flush=True)

    # Every rank updated only its shard and then received the others': the replicas agree.
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    replicas = [torch.empty_like(flat) for _ in range(world_size)]
    dist.all_gather(replicas, flat)
    same = all(torch.equal(replicas[0], r) for r in replicas)
    if rank == 0:
        print(f"parameters identical on all {world_size} ranks: {same}", flush=True)
    dist.destroy_process_group()
    if not same:
        raise SystemExit(f"rank {rank}: the model replicas differ after training")


if __name__ == "__main__":
    main()

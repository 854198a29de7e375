"""The plain usage: a hand-written data-parallel loop with ShardedFusedAdam under torchrun.

    torchrun --nproc-per-node 2 examples/train_custom_loop.py --steps 50

No DDP wrapper: the optimizer averages the gradients over the ranks (like DDP) and keeps
only its own shard of Adam's state. ``launcher.init_distributed()`` can replace the
process-group setup below; it also covers Ascend (hccl), mpirun and SLURM.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

from sharded_fused_adam import ShardedFusedAdam


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")   # RANK etc. come from torchrun
    rank, world_size = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)                      # the same initial weights on every rank
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 1)).to(device)
    opt = ShardedFusedAdam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    true_w = torch.randn(32, 1, generator=torch.Generator().manual_seed(1)).to(device)

    g = torch.Generator().manual_seed(100 + rank)   # each rank draws its own batches
    for step in range(args.steps):
        x = torch.randn(64, 32, generator=g).to(device)
        loss = nn.functional.mse_loss(model(x), x @ true_w)
        opt.zero_grad()
        loss.backward()                       # gradients go to the optimizer, averaged over ranks
        grad_norm = opt.clip_grad_norm_(1.0)  # global norm of the averaged gradient
        opt.step()                            # update this rank's shard, gather the params
        sched.step()
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss (rank 0 batch) {loss.item():.4f}  grad norm {grad_norm.item():.3f}  "
                  f"lr {sched.get_last_lr()[0]:.2e}", flush=True)

    report = opt.memory_report()
    if rank == 0:
        print(f"done on {world_size} ranks: Adam state per rank {report.optimizer_state:,} bytes "
              f"for {report.num_params:,} params ({report.optimizer_state / report.num_params:.1f} bytes/param)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

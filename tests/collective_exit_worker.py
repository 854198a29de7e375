"""Worker for test_collective_exit.py: the last rank SIGKILLs or SIGSTOPs itself inside training.

Usage: ``python collective_exit_worker.py --out DIR --fault kill|stop --timeout S`` under any
launcher. Each rank writes ``pidR`` at start; the victim writes ``victim`` (the time) just
before it signals itself; a survivor writes ``errorR.json`` (time and message) when its
``CollectiveError`` arrives and then lets it propagate, as a training script would, after
a ``finally: destroy_process_group()``.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import launcher  # noqa: E402
from helpers import batch, loss_fn, make_net  # noqa: E402
from sharded_fused_adam import CollectiveError, ShardedFusedAdam  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fault", choices=["kill", "stop"], required=True)
    parser.add_argument("--timeout", type=float, default=2.0)
    args = parser.parse_args()
    launcher.init_distributed("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    (args.out / f"pid{rank}").write_text(str(os.getpid()))
    dist.barrier()  # ranks start seconds apart on a loaded machine: the short timeout is for the fault only
    try:
        model = make_net()
        opt = ShardedFusedAdam(model.parameters(), lr=1e-2, collective_timeout=args.timeout)
        for step in range(3):
            opt.zero_grad()
            loss_fn(model, *batch(step, rank, same_on_all_ranks=False)).backward()
            if step == 1 and rank == world_size - 1:
                (args.out / "victim").write_text(repr(time.time()))
                os.kill(os.getpid(), signal.SIGKILL if args.fault == "kill" else signal.SIGSTOP)
            try:
                opt.step()
            except CollectiveError as exc:
                (args.out / f"error{rank}.json").write_text(json.dumps({"time": time.time(), "message": str(exc)}))
                raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()

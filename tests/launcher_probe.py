"""Probe script for the launcher end-to-end tests: init, all-reduce rank+1, write one JSON file per rank.

Usage: ``python launcher_probe.py --out DIR [--backend B] [--timeout S] [--local_rank N]``
(``--out`` defaults to the SFA_PROBE_OUT environment variable). Each rank writes
``DIR/rank<R>.json`` only after the all-reduce result checked out, so the tests read the
files rather than trusting exit codes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

import launcher


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("SFA_PROBE_OUT"))
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--timeout", type=float, default=None)
    parser.add_argument("--local_rank", type=int, default=None)  # the deepspeed launcher passes it
    args = parser.parse_args()
    if not args.out:
        sys.exit("launcher_probe.py: give --out DIR or set SFA_PROBE_OUT")

    launched = launcher.parse_env(os.environ, sys.argv[1:])  # before init, which exports RANK etc.
    device = launcher.init_distributed(args.backend, timeout=args.timeout)
    again = launcher.init_distributed()  # a second call must be harmless
    rank, world_size = dist.get_rank(), dist.get_world_size()
    value = torch.tensor([float(rank + 1)], device=device)
    dist.all_reduce(value)
    expected = world_size * (world_size + 1) / 2
    if value.item() != expected:
        raise AssertionError(f"all_reduce gave {value.item()}, expected {expected}")

    result = {
        "rank": rank,
        "world_size": world_size,
        "local_rank": launched.local_rank,
        "exported_local_rank": os.environ.get("LOCAL_RANK"),
        "source": launched.source,
        "backend": dist.get_backend(),
        "device": str(device),
        "second_call_device": str(again),
        "sum": value.item(),
        "argv_local_rank": args.local_rank,
        "master": f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}",
    }
    dist.destroy_process_group()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main()

"""Peak extra memory of a gathered ``state_dict()`` for a ~100M-parameter model, per rank.

    torchrun --nproc-per-node 2 benchmarks/checkpoint_memory.py [--params 100e6] [--bucket-mb 25]

Each rank trains one step, then measures its resident set around ``state_dict()`` (Linux
``VmHWM`` after resetting it through ``/proc/self/clear_refs``). The script re-executes itself
with ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc maps every large tensor separately and
unmaps it when freed: the resident set then follows live memory instead of a reused heap. "Extra" is the peak minus the
resident set before the call minus the bytes of the dict it returned: what gathering needed
on top of its result. By design that is one bucket of one state tensor (``bucket_cap_mb``),
not the model. Rank 0 prints a JSON line.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import sys

import torch
import torch.distributed as dist
from torch import nn

from sharded_fused_adam import ShardedFusedAdam


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set


def _dict_bytes(sd: dict) -> int:
    return sum(t.numel() * t.element_size() for entry in sd.get("state", {}).values() for t in entry.values())


def main() -> None:
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", type=float, default=100e6)
    parser.add_argument("--bucket-mb", type=float, default=25.0)
    parser.add_argument("--rank0-only", action="store_true")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    width = 2048
    layers = max(1, round(args.params / (width * width + width)))
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    opt = ShardedFusedAdam(model.parameters(), lr=1e-4, bucket_cap_mb=args.bucket_mb)
    model(torch.randn(2, width)).sum().backward()
    opt.step()
    opt.zero_grad()
    dist.barrier()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed heap pages, so RSS counts live memory
    before = _status_kb("VmRSS")
    _reset_peak()
    sd = opt.state_dict(rank0_only=args.rank0_only)
    peak = _status_kb("VmHWM")
    result = _dict_bytes(sd)
    extra_mib = (peak * 1024 - before * 1024 - result) / 2**20
    report = dict(rank=dist.get_rank(), world_size=dist.get_world_size(),
                  num_params=sum(p.numel() for p in model.parameters()), bucket_cap_mb=args.bucket_mb,
                  rss_before_mib=before / 1024, peak_mib=peak / 1024, result_mib=result / 2**20,
                  extra_mib=round(extra_mib, 1), model_fp32_mib=4 * sum(p.numel() for p in model.parameters()) / 2**20)
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, report)
    if dist.get_rank() == 0:
        print(json.dumps(reports))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

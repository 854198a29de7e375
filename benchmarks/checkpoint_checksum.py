"""What checksums cost: save and load a ~1 GiB sharded checkpoint with and without CRC-32 verification.

Usage: ``python benchmarks/checkpoint_checksum.py [--gib 1.0] [--dir /tmp/sfa_ck] [--repeat 2]``

One process, one rank (no process group): a model of fp32 params whose Adam state (exp_avg
+ exp_avg_sq, 8 bytes per element) is ``--gib`` GiB. It reports, best of ``--repeat``:
the raw CRC-32 rate over memory; ``save_sharded`` (whose CRC is computed while writing);
``load_sharded`` with ``verify=True`` and ``verify=False``; and ``CheckpointReader.verify_all``
(what ``consolidate`` and the CLI's ``verify`` add). The files are in the page cache on
the second read, so load times are memory-speed reads, the case where CRC costs most.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
import zlib
from pathlib import Path

import torch

from sharded_fused_adam import ShardedFusedAdam, load_sharded, save_sharded
from sharded_fused_adam.checkpoint.reader import CheckpointReader


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/sfa_checksum_bench"))
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    numel = int(args.gib * 2**30 / 8)
    params = [torch.nn.Parameter(torch.randn(numel // 8)) for _ in range(8)]
    opt = ShardedFusedAdam(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    state_bytes = 8 * sum(p.numel() for p in params)
    shutil.rmtree(args.dir, ignore_errors=True)
    buffer = bytearray(256 * 2**20)
    crc_s = _best(lambda: zlib.crc32(buffer), args.repeat) * state_bytes / len(buffer)
    save_s = _best(lambda: save_sharded(opt, args.dir), args.repeat)
    verify_s = _best(lambda: load_sharded(opt, args.dir), args.repeat)
    no_verify_s = _best(lambda: load_sharded(opt, args.dir, verify=False), args.repeat)
    verify_all_s = _best(lambda: CheckpointReader(args.dir).verify_all(), args.repeat)
    gib = state_bytes / 2**30
    result = {"state_gib": round(gib, 3), "crc32_over_memory_s": round(crc_s, 3),
              "crc32_gib_per_s": round(gib / crc_s, 2), "save_s": round(save_s, 3),
              "load_verify_s": round(verify_s, 3), "load_no_verify_s": round(no_verify_s, 3),
              "verify_all_s": round(verify_all_s, 3)}
    print(json.dumps(result, indent=2))
    shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()

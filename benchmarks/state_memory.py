"""Bytes per parameter per rank for each master/moment storage, measured at world sizes 1, 2 and 4.

Spawns gloo ranks on this machine, builds the char-GPT of examples/train_gpt.py (808,576
params; ragged shapes, so shards carry a little padding), takes one step and reads
``opt.memory_report()`` on every rank. Prints the table of docs/concepts.md: the measured
bytes per param of params, gradient shard, master and moments (rank 0), their sum, and the
formula ``b + (4 + m + k) / N`` (``b`` param bytes, ``m`` master bytes, ``k`` moment bytes),
then the fp32 staging scratch and the pooled gradient buffers (dropped after each step), and
how the sum plus staging splits between the params' device and host memory (``offload="host"``).

Run: ``.venv/bin/python benchmarks/state_memory.py``.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))

# label -> (param dtype, master_weights, state_dtype, offload, b, m, k)
COMBOS = {
    "fp32 model": (torch.float32, "auto", None, None, 4, 0, 8),
    "bf16 model, 4-byte master": (torch.bfloat16, "fp32", None, None, 2, 4, 8),
    "bf16 model, 2-byte master": (torch.bfloat16, "split", None, None, 2, 2, 8),
    "bf16 model, 2-byte master + bf16 moments": (torch.bfloat16, "split", torch.bfloat16, None, 2, 2, 4),
    "fp32 model, offload='host'": (torch.float32, "auto", None, "host", 4, 0, 8),
    "bf16 model, 4-byte master, offload='host'": (torch.bfloat16, "fp32", None, "host", 2, 4, 8),
    "bf16 model, bf16 moments, offload='host'": (torch.bfloat16, "fp32", torch.bfloat16, "host", 2, 4, 4),
}


def _rank(rank: int, world_size: int, store: str, out: dict) -> None:
    import train_gpt

    from sharded_fused_adam import ShardedFusedAdamW

    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world_size), rank=rank, world_size=world_size)
    try:
        config = train_gpt.GPTConfig(vocab_size=96)
        for label, (dtype, master, state_dtype, offload, *_) in COMBOS.items():
            torch.manual_seed(0)
            model = train_gpt.GPT(config).to(dtype)
            opt = ShardedFusedAdamW(model.parameters(), lr=1e-3, master_weights=master, state_dtype=state_dtype,
                                    offload=offload)
            idx = torch.randint(0, 96, (2, 64))
            model(idx, idx).float().backward()
            opt.step()
            if rank == 0:
                out[(label, world_size)] = opt.memory_report().as_dict()
    finally:
        dist.destroy_process_group()


def main() -> None:
    manager = mp.Manager()
    out = manager.dict()
    for world_size in (1, 2, 4):
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_rank, args=(world_size, os.path.join(tmp, "store"), out), nprocs=world_size)
    print("| storage | N | params | grad shard | master | moments | sum | formula b + (4 + m + k)/N "
          "| staging | comm buffers | on the device | in host memory |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label, (_, _, _, _, b, m, k) in COMBOS.items():
        for world_size in (1, 2, 4):
            r = out[(label, world_size)]
            psi = r["num_params"]
            cells = [r["params"], r["grad_shards"], r["master_shards"], r["moments"]]
            measured = sum(cells) / psi
            formula = b + (4 + m + k) / world_size
            print(f"| {label} | {world_size} | " + " | ".join(f"{c / psi:.3f}" for c in cells)
                  + f" | {measured:.3f} | {formula:.3f} | {r['staging'] / psi:.3f} | {r['comm_buffers'] / psi:.2f}"
                  + f" | {(measured * psi - r['host_state'] + r['staging']) / psi:.3f} | {r['host_state'] / psi:.3f} |")
    print(f"Ψ = {out[('fp32 model', 1)]['num_params']:,} params")


if __name__ == "__main__":
    main()

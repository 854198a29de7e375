"""What the compact state costs: the update phase and a whole step for each master/moment storage.

Single process, world size 1, one bucket of ``--numel`` elements in ``--num-params`` params
(as ``bench_kernel.py``). For each combination of param dtype, ``master_weights`` and
``state_dtype`` it builds a ``ShardedFusedAdam`` and times, interleaved round by round
(medians reported):

* ``update``: ``opt._update_shards`` (the kernel, plus for a split master rebuilding and
  splitting it, plus for bf16 moments widening and rounding them; for 4-byte masters the
  rounding into the params);
* ``step``: ``zero_grad`` + hand-set ``param.grad`` + ``opt.step()``.

Run: ``.venv/bin/python benchmarks/bench_state.py [--aligned] [--chunk-numel N]``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules, also when imported
from bench_kernel import param_sizes  # noqa: E402
from report import md_table  # noqa: E402
from runner import REPO, machine_facts, write_json  # noqa: E402

import sharded_fused_adam.core.bucket as bucket_module  # noqa: E402
from sharded_fused_adam import ShardedFusedAdam  # noqa: E402

# (label, param dtype, master_weights, state_dtype)
COMBOS = (
    ("fp32 model", torch.float32, "fp32", None),
    ("fp32 model, bf16 moments", torch.float32, "fp32", torch.bfloat16),
    ("bf16 model, 4-byte master", torch.bfloat16, "fp32", None),
    ("bf16 model, 2-byte master", torch.bfloat16, "split", None),
    ("bf16 model, 2-byte master + bf16 moments", torch.bfloat16, "split", torch.bfloat16),
    ("bf16 model, 4-byte master + bf16 moments", torch.bfloat16, "fp32", torch.bfloat16),
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--num-params", type=int, default=1000)
    p.add_argument("--numel", type=int, default=8_399_360)
    p.add_argument("--aligned", action="store_true", help="param numels multiples of 16 (one kernel segment)")
    p.add_argument("--chunk-numel", type=int, default=None, help="override CHUNK_NUMEL (a multiple of 16)")
    p.add_argument("--iters", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--combos", default="all", help="comma list of combo indices (0-based) or 'all'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="cpu1")
    p.add_argument("--results-dir", type=Path, default=REPO / "benchmarks" / "results")
    return p.parse_args(argv)


def build(sizes: list[int], dtype: torch.dtype, master: str, state_dtype) -> dict[str, Callable[[], None]]:
    numel = sum(sizes)
    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in sizes]
    opt = ShardedFusedAdam(params, lr=1e-3, bucket_cap_mb=numel * 4 / 2**20 + 1, master_weights=master,
                           state_dtype=state_dtype)
    grads = [torch.randn(s, generator=gen).to(dtype) for s in sizes]
    mask = tuple([True] * len(params))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()

    step()
    return {"update": lambda: opt._update_shards(mask, 1.0), "step": step}


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    if args.chunk_numel is not None:
        bucket_module.CHUNK_NUMEL = args.chunk_numel
    sizes = param_sizes(args.num_params, args.numel, aligned=args.aligned, seed=args.seed)
    chosen = range(len(COMBOS)) if args.combos == "all" else [int(i) for i in args.combos.split(",")]
    cases = {}
    for i in chosen:
        label, dtype, master, state_dtype = COMBOS[i]
        for phase, fn in build(sizes, dtype, master, state_dtype).items():
            cases[(label, phase)] = fn
    samples: dict = {k: [] for k in cases}
    for it in range(args.warmup + args.iters):
        for key, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            if it >= args.warmup:
                samples[key].append(time.perf_counter() - t0)
    medians = {k: statistics.median(v) for k, v in samples.items()}
    rows = []
    for i in chosen:
        label = COMBOS[i][0]
        rows.append([label, f"{medians[(label, 'update')] * 1e3:.2f}", f"{medians[(label, 'step')] * 1e3:.2f}"])
    facts = machine_facts()
    chunk = bucket_module.CHUNK_NUMEL
    md = (f"# Compact state: {sum(sizes):,} elements in {len(sizes)} params, 1 thread, chunk {chunk:,}\n\n"
          f"Medians of {args.iters} interleaved rounds{' (aligned sizes)' if args.aligned else ''}; "
          f"load average {facts['loadavg'][0]:.2f}.\n\n"
          + md_table(["storage", "update ms", "zero_grad + step() ms"], rows))
    tag = args.tag + ("_aligned" if args.aligned else "")
    write_json(args.results_dir / f"state_{tag}.json",
               {"numel": sum(sizes), "chunk_numel": chunk, "facts": facts,
                "median_s": {f"{k[0]} / {k[1]}": v for k, v in medians.items()}})
    (args.results_dir / f"state_{tag}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()

"""Local-update bandwidth: ShardedFusedAdam's shard update against ``torch._fused_adam_`` on one flat tensor.

The DESIGN's performance model says the local step on a shard of S elements should cost what
torch's fused kernel costs on one flat tensor of S elements. This single-process benchmark
builds a ``ShardedFusedAdam`` at world size 1 over ``--num-params`` params (random sizes, one
bucket) and times, interleaved round by round (medians reported):

* ``ours: update phase``: ``opt._update_shards`` (the kernel on the bucket's shard segments
  plus the per-bucket bookkeeping; for bf16 the fp32 master is rounded back into the params);
* ``ours: kernel on segments``: the optimizer's kernel called directly on the same segments
  (with the bucket's cached segment views, as the update phase uses them);
* ``ours: zero_grad + step()``: ``opt.step()`` with ``param.grad`` set by hand (adds
  collecting the per-param gradients into the shard, which hooks do during backward in
  training, and the overflow / grad-norm check);
* ``torch: one flat tensor``: ``torch._fused_adam_`` on a single tensor of the same numel
  (for bf16: on an fp32 master, then ``copy_`` into a bf16 flat tensor);
* ``torch: per-param views``: the same op over the ``--num-params`` fragment views, i.e. what
  ``torch.optim.Adam(fused=True)`` does with that many params.

Effective bandwidth counts 28 bytes per element (read p, g, m, v; write p, m, v in fp32);
the bf16 round-trip moves 6 more (read the fp32 master, write bf16), not counted in GB/s.
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
from report import md_table  # noqa: E402
from runner import REPO, machine_facts, write_json  # noqa: E402

from sharded_fused_adam import ShardedFusedAdam  # noqa: E402

BYTES_PER_ELEMENT = 28
HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--num-params", type=int, default=1000)
    p.add_argument("--numel", type=int, default=8_399_360, help="total elements (default: one rank's half of Ψ)")
    p.add_argument("--dtypes", default="fp32,bf16", help="param dtypes to run (fp32, bf16)")
    p.add_argument("--aligned", action="store_true",
                   help="make every param numel a multiple of 16 (then ours runs one kernel call)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="cpu1")
    p.add_argument("--results-dir", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args(argv)
    if args.num_params < 1 or args.numel < args.num_params or args.iters < 1 or args.warmup < 0:
        p.error("need --num-params >= 1, --numel >= --num-params, --iters >= 1, --warmup >= 0")
    args.dtype_list = [d for d in args.dtypes.split(",") if d]
    if not args.dtype_list or any(d not in ("fp32", "bf16") for d in args.dtype_list):
        p.error(f"--dtypes must be a comma list of fp32, bf16; got {args.dtypes!r}")
    return args


def param_sizes(num_params: int, numel: int, *, aligned: bool, seed: int) -> list[int]:
    """``num_params`` random sizes summing to about ``numel`` (ragged unless ``aligned``)."""
    gen = torch.Generator().manual_seed(seed)
    weights = torch.rand(num_params, generator=gen, dtype=torch.float64) + 0.05
    sizes = [max(1, int(w)) for w in (weights / weights.sum() * numel).tolist()]
    if aligned:
        sizes = [max(16, s - s % 16) for s in sizes]
    return sizes


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _steps(n: int, device: torch.device) -> list[torch.Tensor]:
    return [torch.full((), 1.0, device=device) for _ in range(n)]


def build_cases(sizes: list[int], dtype: torch.dtype, device: torch.device) -> tuple[dict[str, Callable[[], None]], int]:
    """The timed callables for one param dtype, and the number of kernel segments ours runs."""
    numel = sum(sizes)
    params = [torch.nn.Parameter(torch.randn(s, device=device).to(dtype)) for s in sizes]
    opt = ShardedFusedAdam(params, lr=HYPER["lr"], bucket_cap_mb=numel * 4 / 2**20 + 1)
    assert len(opt._buckets) == 1, len(opt._buckets)  # one bucket holds every param
    grads = [torch.randn(s, device=device).to(dtype) for s in sizes]

    def ours_step() -> None:
        opt.zero_grad(set_to_none=True)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()

    ours_step()  # the shard now holds a gradient, so the update phase alone can be repeated
    bucket, mask = opt._buckets[0], tuple([True] * len(params))
    segments = bucket.segments_to_update(mask)

    def ours_kernel() -> None:
        views = bucket.segment_views(tuple((start, end) for start, end, _ in segments))
        opt._kernel.adam_step(views.master, views.grad, views.exp_avg,
                              views.exp_avg_sq, [], [s for _, _, s in segments], lr=HYPER["lr"],
                              beta1=HYPER["beta1"], beta2=HYPER["beta2"], eps=HYPER["eps"],
                              weight_decay=0.0, amsgrad=False, decoupled=False)
        bucket.publish_master()

    p32, g32 = torch.randn(numel, device=device), torch.randn(numel, device=device)
    m32, v32 = torch.zeros(numel, device=device), torch.zeros(numel, device=device)
    low = torch.empty(numel, dtype=dtype, device=device) if dtype != torch.float32 else None
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    views = [[t.narrow(0, a, b - a) for a, b in zip(offsets, offsets[1:])] for t in (p32, g32, m32, v32)]
    low_views = [low.narrow(0, a, b - a) for a, b in zip(offsets, offsets[1:])] if low is not None else []
    one_step, many_steps = _steps(1, device), _steps(len(sizes), device)

    def torch_flat() -> None:
        torch._fused_adam_([p32], [g32], [m32], [v32], [], one_step, **HYPER)
        if low is not None:
            low.copy_(p32)

    def torch_views() -> None:
        torch._fused_adam_(*views, [], many_steps, **HYPER)
        if low_views:
            torch._foreach_copy_(low_views, views[0])

    cases = {
        "ours: update phase": lambda: opt._update_shards(mask, 1.0),
        "ours: kernel on segments": ours_kernel,
        "ours: zero_grad + step()": ours_step,
        "torch: one flat tensor": torch_flat,
        f"torch: {len(sizes)} per-param views": torch_views,
    }
    return cases, len(segments)


def time_cases(cases: dict[str, Callable[[], None]], iters: int, warmup: int, device: torch.device) -> dict[str, float]:
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for it in range(warmup + iters):
        for name, fn in cases.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if it >= warmup:
                samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in samples.items()}


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sizes = param_sizes(args.num_params, args.numel, aligned=args.aligned, seed=args.seed)
    numel = sum(sizes)
    result = {"numel": numel, "num_params": len(sizes), "threads": args.threads, "device": str(device),
              "iters": args.iters, "facts": machine_facts(), "dtypes": {}}
    rows = []
    for name in args.dtype_list:
        dtype = torch.float32 if name == "fp32" else torch.bfloat16
        cases, num_segments = build_cases(sizes, dtype, device)
        medians = time_cases(cases, args.iters, args.warmup, device)
        flat_s = medians["torch: one flat tensor"]
        result["dtypes"][name] = {"median_s": medians, "kernel_segments": num_segments}
        for case, sec in medians.items():
            rows.append([name, case, f"{sec * 1e3:.2f}", f"{numel * BYTES_PER_ELEMENT / sec / 1e9:.2f}",
                         f"{sec / flat_s:.3f}"])
        del cases
    header = f"# Local Adam update: {numel:,} elements in {len(sizes)} params on {device}, {args.threads} thread(s)\n\n"
    segments = ", ".join(f"{k}: {v['kernel_segments']}" for k, v in result["dtypes"].items())
    notes = (f"Medians of {args.iters} interleaved rounds; GB/s at {BYTES_PER_ELEMENT} bytes/element. "
             f"Kernel segments ours ran per update ({segments}): a ragged param ends a segment, for bitwise "
             "parity with torch; --aligned gives one. "
             f"Load average {result['facts']['loadavg'][0]:.2f}.\n\n")
    md = header + notes + md_table(["params", "case", "median ms", "GB/s", "x flat"], rows)
    write_json(args.results_dir / f"kernel_{args.tag}.json", result)
    (args.results_dir / f"kernel_{args.tag}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()

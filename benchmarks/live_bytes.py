"""Live tensor bytes through training steps, counted from real allocations (torch.profiler).

``torch.profiler`` with ``profile_memory=True`` records every allocation and free of the CPU
allocator on the profiled thread, with its size and time. Started *before* the model is
built, the running sum of those records is the bytes of every tensor alive at that instant
that this configuration allocated (params, grads, optimizer state, activations, comm buffers,
temporaries), independent of any report of ours. Limits: allocations made and freed on other
threads (gloo's own work threads) are not seen; the profiler's own bookkeeping is not a tensor.

``measure`` returns the timeline of the last step with its phases (forward, backward, step),
its peak, and the largest allocations alive at the peak named by the op that made them.
``python benchmarks/live_bytes.py`` runs DDP + Adam(fused), torch ZeRO and ours at 1x16 and
8x64 on 2 gloo ranks and writes ``<results>/live_bytes_<tag>.json`` and a timeline PNG.
"""
from __future__ import annotations

import argparse
import bisect
import gc
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from configs import LABELS, Settings, build  # noqa: E402
from models import GPTLike, ModelSpec, make_batches, parse_batch  # noqa: E402
from runner import REPO, init_rank, launch_torchrun, read_json, write_json  # noqa: E402

__all__ = ["measure"]

PHASES = ("forward", "backward", "step")
MiB = 2**20


def _train_step(trainer: Any, tokens: torch.Tensor, targets: torch.Tensor, step: int) -> None:
    with record_function(f"phase:forward:{step}"):
        loss = trainer.forward(tokens, targets)
    with record_function(f"phase:backward:{step}"):
        trainer.backward(loss)
        del loss
    with record_function(f"phase:step:{step}"):
        trainer.step()
        trainer.drain()


def _timeline(prof: profile) -> tuple[list, list, list]:
    """(memory events as (t_ns, bytes), phase spans as (name, step, start, end), ops as (start, end, name))."""
    memory, phases, ops = [], [], []
    for e in prof.profiler.kineto_results.events():
        if e.name() == "[memory]":
            if e.device_type() == torch.device("cpu").type or str(e.device_type()).endswith("CPU"):
                memory.append((e.start_ns(), e.nbytes()))
        elif e.name().startswith("phase:"):
            _, name, step = e.name().split(":")
            phases.append((name, int(step), e.start_ns(), e.end_ns()))
        elif not e.name().startswith("ProfilerStep"):
            ops.append((e.start_ns(), e.end_ns(), e.name()))
    memory.sort()
    ops.sort()
    return memory, phases, ops


def _innermost_op(ops: list, starts: list, t: int) -> str:
    """The op with the latest start that still covers ``t`` (looking back at most 64 ops)."""
    i = bisect.bisect_right(starts, t) - 1
    for j in range(i, max(-1, i - 64), -1):
        if ops[j][1] >= t:
            return ops[j][2]
    return "?"


def measure(trainer_factory: Any, data: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    """Build a trainer with ``trainer_factory()`` and run ``data`` through it under the profiler.

    Returns:
        ``steady``: live bytes just before the last step; ``peak``: the maximum during the
        last step, with the phase it fell in; ``points``: the last step's timeline as
        ``(ms since the step began, live bytes)``; ``phases``: the phases' start and end in
        ms; ``top``: the largest allocations made during the last step that were still
        outstanding at the peak, with the op that made them (sizes, not matched to frees).
    """
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer = trainer_factory()
        for step, (tokens, targets) in enumerate(data):
            _train_step(trainer, tokens, targets, step)
        del trainer
        gc.collect()
    memory, phases, ops = _timeline(prof)
    last = len(data) - 1
    spans = {name: (s, e) for name, step, s, e in phases if step == last}
    t0, t1 = spans["forward"][0], spans["step"][1]
    live, steady, points, peak, peak_t, peak_index = 0, 0, [], 0, t0, 0
    for i, (t, nbytes) in enumerate(memory):
        if t < t0:
            live += nbytes
            steady = live
            continue
        if t > t1:
            break
        live += nbytes
        points.append(((t - t0) / 1e6, live))
        if live > peak:
            peak, peak_t, peak_index = live, t, i
    starts = [o[0] for o in ops]
    grown = sorted(((nb, t) for t, nb in memory[:peak_index + 1] if t >= t0 and nb > 0), reverse=True)[:8]
    phase = next((name for name, (s, e) in spans.items() if s <= peak_t <= e), "?")
    return {"steady": steady, "peak": peak, "peak_phase": phase, "peak_ms": (peak_t - t0) / 1e6,
            "phases": {k: ((s - t0) / 1e6, (e - t0) / 1e6) for k, (s, e) in spans.items()},
            "points": _thin(points), "top": [(nb, _innermost_op(ops, starts, t)) for nb, t in grown]}


def _thin(points: list, limit: int = 4000) -> list:
    """At most ``limit`` points, keeping each stride's maximum (peaks must survive)."""
    if len(points) <= limit:
        return points
    stride = -(-len(points) // limit)
    return [max(points[i:i + stride], key=lambda p: p[1]) for i in range(0, len(points), stride)]


def rank_main(args: argparse.Namespace) -> None:
    rank, world_size = init_rank()
    spec = ModelSpec()
    out: dict[str, Any] = {"rank": rank, "world_size": world_size, "num_params": spec.num_params, "runs": []}
    for label in args.batches.split(","):
        batch = parse_batch(label)
        data = make_batches(batch, spec.vocab, args.steps, rank=rank, seed=1234)
        for name in args.configs.split(","):
            torch.manual_seed(1234)
            dist.barrier()
            result = measure(lambda: build(name, GPTLike(spec), Settings(bucket_mb=args.bucket_mb),
                                           micro_batch=batch.batch), data)
            out["runs"].append({"config": name, "batch": label, **result})
            print(f"rank {rank}: {name} {label} peak {result['peak'] / MiB:.1f} MiB ({result['peak_phase']})",
                  flush=True)
    write_json(args.results_dir / "raw" / f"live_bytes_{args.tag}_rank{rank}.json", out)
    dist.barrier()
    dist.destroy_process_group()


def plot(ranks: list[dict], path: Path) -> Path:
    """One panel per batch: rank 0's live bytes through the last step, per configuration."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = ranks[0]["runs"]
    batches = list(dict.fromkeys(r["batch"] for r in runs))
    fig, axes = plt.subplots(1, len(batches), figsize=(6.5 * len(batches), 4.2), squeeze=False)
    for ax, label in zip(axes[0], batches):
        for r in (r for r in runs if r["batch"] == label):
            xs = [p[0] / max(1e-9, r["phases"]["step"][1]) for p in r["points"]]  # normalized step time
            name = r["config"].replace(" (before)", "")
            legend = LABELS.get(name, name) + (" before" if name != r["config"] else "")
            ax.plot(xs, [p[1] / MiB for p in r["points"]], label=f"{legend} (peak {r['peak'] / MiB:.0f} MiB)",
                    linewidth=1.2, linestyle="--" if name != r["config"] else "-")
        ax.set_title(f"live tensor bytes, rank 0, batch {label}")
        ax.set_xlabel("fraction of one training step (forward, backward, step)")
        ax.set_ylabel("MiB")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="ddp_adam,torch_zero,ours")
    p.add_argument("--batches", default="1x16,8x64")
    p.add_argument("--steps", type=int, default=3, help="steps per configuration; the last one is reported")
    p.add_argument("--bucket-mb", type=float, default=25.0)
    p.add_argument("--tag", default="gloo2")
    p.add_argument("--results-dir", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--plot", type=Path, default=REPO / "docs" / "benchmarks" / "live_bytes.png")
    p.add_argument("--before", default="", help="tag of an earlier run whose 'ours' line the plot also shows")
    p.add_argument("--role", default="parent", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.role == "rank":
        return rank_main(args)
    flags = [f"--{k}={getattr(args, k.replace('-', '_'))}" for k in
             ("configs", "batches", "steps", "bucket-mb", "tag", "results-dir")] + ["--role=rank"]
    proc = launch_torchrun(Path(__file__).resolve(), flags, nproc=2, timeout_s=3600)
    paths = [args.results_dir / "raw" / f"live_bytes_{args.tag}_rank{r}.json" for r in range(2)]
    if not all(p.exists() for p in paths):
        raise RuntimeError(f"ranks failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")
    ranks = [read_json(p) for p in paths]
    if args.before:  # overlay ours from an earlier run (e.g. before a change) as "<config> (before)"
        earlier = read_json(args.results_dir / "raw" / f"live_bytes_{args.before}_rank0.json")["runs"]
        ranks[0]["runs"] += [{**r, "config": f"{r['config']} (before)"} for r in earlier if r["config"] == "ours"]
    summary = [{k: v for k, v in r.items() if k != "points"} for r in ranks[0]["runs"]]
    write_json(args.results_dir / f"live_bytes_{args.tag}.json", {"rank0": summary, "rank1": [
        {k: v for k, v in r.items() if k != "points"} for r in ranks[1]["runs"]]})
    print(f"wrote {plot(ranks, args.plot)}")
    for r in summary:
        print(f"{r['config']:>12} {r['batch']:>5}: before step {r['steady'] / MiB:7.1f} MiB, peak "
              f"{r['peak'] / MiB:7.1f} MiB in {r['peak_phase']}; largest: "
              + ", ".join(f"{nb / MiB:.1f} {op}" for nb, op in r["top"][:5]))


if __name__ == "__main__":
    main()

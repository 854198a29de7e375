"""Training-step benchmark: ShardedFusedAdam against DDP, torch ZeRO and DeepSpeed ZeRO-1/2 on 2 gloo ranks.

One invocation (``python benchmarks/bench_step.py``) does three things:

1. Timing: one torchrun job whose ranks build all configurations side by side from the same
   seed, then time them interleaved, ``A B C D E A B C D E ...`` (``--steps-per-round`` steps
   each, a barrier before each), so machine noise hits every configuration alike. Every
   configuration trains on the same batches, so the final params are compared with DDP's.
2. Memory: one short torchrun job per (configuration, batch), because ``ru_maxrss`` is a
   process-wide high-water mark: each job builds one configuration, runs a few steps and
   reports its peak RSS and its RSS just before the model was built.
3. Report: the raw per-rank JSON under ``<results>/raw/``, the combined
   ``<results>/step_<tag>.json``, a markdown table ``<results>/step_<tag>.md`` and PNG plots
   in ``<plots>/``.

``--breakdown`` adds, in the timing job, instrumented rounds of DDP and ours that split an
iteration into forward, backward compute (measured under ``no_sync``), exposed gradient
communication, and for ours the step's reduce-wait / update / gather.
Run under torchrun directly (``torchrun --nproc-per-node 2 benchmarks/bench_step.py``), it does
the timing part only and rank 0 writes the report without the memory columns.
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules, also when imported
import breakdown  # noqa: E402
import report  # noqa: E402
from configs import CONFIGS, DS_ADAM_CHOICES, VARIANTS, Settings, build  # noqa: E402
from models import BatchSpec, GPTLike, ModelSpec, make_batches, parse_batch  # noqa: E402
from runner import (REPO, current_rss, init_rank, launch_torchrun, machine_facts, peak_rss,  # noqa: E402
                    read_json, write_json)

TINY_MODEL = ModelSpec(vocab=256, dim=32, hidden=64, num_blocks=2)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tag", default="gloo2", help="name of this run in the output file names")
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help=f"comma list from {CONFIGS}, or variants of ours {tuple(VARIANTS)}")
    p.add_argument("--batches", default="8x64,1x16", help="comma list of <batch>x<seq> per rank")
    p.add_argument("--rounds", default="auto",
                   help="timed rounds: one value, one per batch, or auto (10 at >= 128 tokens per rank, else 40)")
    p.add_argument("--steps-per-round", type=int, default=1)
    p.add_argument("--warmup", type=int, default=2, help="untimed interleaved rounds first")
    p.add_argument("--nproc", type=int, default=2, help="ranks (gloo, CPU)")
    p.add_argument("--bucket-mb", type=float, default=25.0, help="bucket size for every configuration")
    p.add_argument("--ds-adam", choices=DS_ADAM_CHOICES, default="fused",
                   help="fused: client torch.optim.Adam(fused=True); torch_adam: config "
                        "'torch_adam': true (torch's unfused Adam); deepspeed: DeepSpeed's own (compiles)")
    p.add_argument("--ds-overlap-comm", action="store_true", help="DeepSpeed overlap_comm")
    p.add_argument("--memory-steps", type=int, default=3, help="steps in each memory job")
    p.add_argument("--no-memory", action="store_true", help="skip the per-configuration memory jobs")
    p.add_argument("--breakdown", action="store_true", help="also time the phases of ours and DDP")
    p.add_argument("--breakdown-rounds", default="auto", help="like --rounds (auto: 4 or 15)")
    p.add_argument("--quick", action="store_true", help="tiny model (for smoke tests; numbers mean nothing)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--results-dir", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--plot-dir", type=Path, default=REPO / "docs" / "benchmarks")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per torchrun job")
    p.add_argument("--role", choices=("parent", "timing", "memory"), default="parent", help=argparse.SUPPRESS)
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.config_list = [c for c in args.configs.split(",") if c]
    unknown = [c for c in args.config_list if c not in CONFIGS and c not in VARIANTS]
    if unknown or not args.config_list:
        p.error(f"--configs must be a comma list from {CONFIGS}, got {args.configs!r}")
    try:
        args.batch_list = [parse_batch(b) for b in args.batches.split(",") if b]
    except ValueError as exc:
        p.error(str(exc))
    args.round_list = _per_batch(p, "--rounds", args.rounds, args.batch_list, (10, 40))
    args.breakdown_round_list = _per_batch(p, "--breakdown-rounds", args.breakdown_rounds, args.batch_list, (4, 15))
    if args.steps_per_round < 1 or args.warmup < 0 or args.memory_steps < 1:
        p.error("--steps-per-round and --memory-steps must be >= 1, --warmup >= 0")
    args.model_spec = TINY_MODEL if args.quick else ModelSpec()
    args.settings = Settings(bucket_mb=args.bucket_mb, ds_adam=args.ds_adam, ds_overlap_comm=args.ds_overlap_comm)
    return args


def _per_batch(p: argparse.ArgumentParser, flag: str, text: str, batches: list[BatchSpec],
               auto: tuple[int, int]) -> list[int]:
    """Rounds per batch; ``auto`` gives big batches (>= 128 tokens per rank) ``auto[0]``, small ``auto[1]``."""
    if text == "auto":
        return [auto[0] if b.batch * b.seq >= 128 else auto[1] for b in batches]
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        p.error(f"{flag} must be auto or comma-separated integers, got {text!r}")
    if len(values) == 1:
        values = values * len(batches)
    if len(values) != len(batches) or min(values) < 1:
        p.error(f"{flag} needs one value >= 1 or one per batch ({len(batches)}), got {text!r}")
    return values


def _raw(args: argparse.Namespace, name: str) -> Path:
    return args.results_dir / "raw" / f"step_{args.tag}_{name}.json"


def _barrier() -> None:
    dist.barrier()


# ---- timing (inside each rank) ------------------------------------------------------------
def _build_all(args: argparse.Namespace, spec: BatchSpec) -> list:
    torch.manual_seed(args.seed)
    base = GPTLike(args.model_spec)
    trainers = [build(name, copy.deepcopy(base), args.settings, micro_batch=spec.batch) for name in args.config_list]
    torch.set_num_threads(1)
    return trainers


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def time_batch(args: argparse.Namespace, spec: BatchSpec, rounds: int, rank: int) -> dict[str, Any]:
    """Build every configuration, run warm-up and timed rounds interleaved, compare final params."""
    num_steps = (args.warmup + rounds) * args.steps_per_round
    data = make_batches(spec, args.model_spec.vocab, num_steps, rank=rank, seed=args.seed)
    trainers = _build_all(args, spec)
    times: dict[str, list] = {t.name: [] for t in trainers}
    cpu: dict[str, list] = {t.name: [] for t in trainers}  # process CPU s (all threads) per step
    cursor = 0
    for r in range(args.warmup + rounds):
        for t in trainers:
            _barrier()
            for k in range(args.steps_per_round):
                cpu0 = time.process_time()
                step_times = t.train_step(*data[cursor + k])
                drain = 0.0
                if k == args.steps_per_round - 1:  # the round's last step pays for what it left in flight
                    t0 = time.perf_counter()
                    t.drain()
                    drain = time.perf_counter() - t0
                if r >= args.warmup:
                    cpu[t.name].append(time.process_time() - cpu0)
                    times[t.name].append([step_times.forward, step_times.backward, step_times.step + drain])
        cursor += args.steps_per_round
    assert torch.get_num_threads() == 1, torch.get_num_threads()
    ref = next((t for t in trainers if t.name == "ddp_adam"), None)
    ref_flat = ref.flat_params() if ref is not None else None
    out: dict[str, Any] = {"batch": spec.label, "rounds": rounds, "num_steps": num_steps,
                           "order": [t.name for t in trainers], "configs": {}}
    for t in trainers:
        held = t.held_bytes()
        entry: dict[str, Any] = {"step_phases_s": times[t.name], "cpu_s": cpu[t.name], "held_masters": held.masters,
                                 "held_state": held.state}
        if ref_flat is not None:
            entry["max_abs_diff_vs_ddp"] = _max_abs_diff(t.flat_params(), ref_flat)
        if t.name == "ours" or t.name in VARIANTS:
            entry["memory_report"] = t.optimizer.memory_report().as_dict()
            entry["last_step_comm_bytes"] = dict(t.optimizer.last_step_comm_bytes)
        out["configs"][t.name] = entry
    del trainers, ref
    gc.collect()
    return out


def rank_timing(args: argparse.Namespace) -> None:
    rank, world_size = init_rank()
    result: dict[str, Any] = {"rank": rank, "world_size": world_size, "facts_start": machine_facts(),
                              "model_params": args.model_spec.num_params, "batches": [], "breakdown": []}
    for spec, rounds in zip(args.batch_list, args.round_list):
        result["batches"].append(time_batch(args, spec, rounds, rank))
        print(f"rank {rank}: timed {spec.label}", flush=True)
    if args.breakdown:
        for spec, rounds in zip(args.batch_list, args.breakdown_round_list):
            result["breakdown"].append(breakdown.run(args, spec, rounds, rank))
            print(f"rank {rank}: breakdown {spec.label}", flush=True)
    result["facts_end"] = machine_facts()
    write_json(_raw(args, f"timing_rank{rank}"), result)
    _barrier()
    if rank == 0 and "TORCHELASTIC_RUN_ID" in os.environ and args.role == "parent":
        # Launched by the user's torchrun rather than by our parent: report timing only.
        _write_report(args, [read_json(_raw(args, f"timing_rank{r}")) for r in range(world_size)], [])
    dist.destroy_process_group()


# ---- memory (one configuration per job) -----------------------------------------------------
def rank_memory(args: argparse.Namespace) -> None:
    rank, world_size = init_rank()
    spec = args.batch_list[0]
    if args.config.startswith("ds_"):
        import deepspeed  # noqa: F401  (its import is part of the baseline, not the delta)
    data = make_batches(spec, args.model_spec.vocab, args.warmup + args.memory_steps, rank=rank, seed=args.seed)
    gc.collect()
    baseline = current_rss()
    torch.manual_seed(args.seed)
    trainer = build(args.config, GPTLike(args.model_spec), args.settings, micro_batch=spec.batch)
    for tokens, targets in data:
        trainer.train_step(tokens, targets)
    held = trainer.held_bytes()
    write_json(_raw(args, f"mem_{args.config}_{spec.label}_rank{rank}"), {
        "rank": rank, "world_size": world_size, "config": args.config, "batch": spec.label,
        "baseline_rss": baseline, "peak_rss": peak_rss(), "final_rss": current_rss(),
        "held_masters": held.masters, "held_state": held.state,
    })
    _barrier()
    dist.destroy_process_group()


# ---- parent ---------------------------------------------------------------------------------
def _child_args(args: argparse.Namespace, role: str, **overrides: str) -> list[str]:
    values = {"tag": args.tag, "configs": args.configs, "batches": args.batches, "rounds": args.rounds,
              "steps-per-round": args.steps_per_round, "warmup": args.warmup, "bucket-mb": args.bucket_mb,
              "ds-adam": args.ds_adam, "memory-steps": args.memory_steps, "seed": args.seed,
              "breakdown-rounds": args.breakdown_rounds, "results-dir": args.results_dir,
              "plot-dir": args.plot_dir, "role": role, **overrides}
    flags = [f"--{k}={v}" for k, v in values.items()]
    flags += [f"--{name}" for name in ("quick", "breakdown", "ds-overlap-comm")
              if getattr(args, name.replace("-", "_"))]
    return flags


def _run_job(args: argparse.Namespace, expected: list[Path], **overrides: str) -> list[dict]:
    for path in expected:
        path.unlink(missing_ok=True)
    started = time.perf_counter()
    proc = launch_torchrun(Path(__file__).resolve(), _child_args(args, **overrides), nproc=args.nproc,
                           timeout_s=args.timeout)
    missing = [p for p in expected if not p.exists()]
    if missing:
        raise RuntimeError(f"torchrun exited with {proc.returncode} and these results are missing: "
                           f"{[str(p) for p in missing]}\n--- output tail ---\n{(proc.stdout + proc.stderr)[-6000:]}")
    if proc.returncode != 0:  # every rank wrote its results; DeepSpeed sometimes aborts at exit
        print(f"warning: torchrun exited with {proc.returncode} after all ranks wrote their results",
              file=sys.stderr)
    print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)
    return [read_json(p) for p in expected]


def _write_report(args: argparse.Namespace, timing: list[dict], memory: list[dict]) -> None:
    summary = report.summarize(timing, memory, settings=args.settings.__dict__, tag=args.tag,
                               quick=args.quick, steps_per_round=args.steps_per_round)
    write_json(args.results_dir / f"step_{args.tag}.json", summary)
    md_path = args.results_dir / f"step_{args.tag}.md"
    plots = report.plot_step(summary, args.plot_dir, args.tag)
    md_path.write_text(report.step_markdown(summary, plots, md_path.parent))
    print(f"wrote {md_path}, {args.results_dir / f'step_{args.tag}.json'} and {len(plots)} plot(s) in {args.plot_dir}")


def parent(args: argparse.Namespace) -> None:
    ranks = range(args.nproc)
    print(f"timing {args.config_list} at {args.batches} on {args.nproc} ranks", flush=True)
    timing = _run_job(args, [_raw(args, f"timing_rank{r}") for r in ranks], role="timing")
    memory: list[dict] = []
    if not args.no_memory:
        for spec in args.batch_list:
            for name in args.config_list:
                print(f"memory {name} {spec.label}", flush=True)
                memory += _run_job(args, [_raw(args, f"mem_{name}_{spec.label}_rank{r}") for r in ranks],
                                   role="memory", config=name, batches=spec.label,
                                   rounds="1", **{"breakdown-rounds": "1"})
    _write_report(args, timing, memory)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.role == "memory":
        rank_memory(args)
    elif args.role == "timing" or "RANK" in os.environ:
        rank_timing(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()

"""The collective measurement behind comm.py's [Note: collective choice], re-runnable on any backend.

A ZeRO step needs each shard's gradient sum on its owner and every owner's shard on every
rank. On one flat fp32 buffer (default 16.8M elements, the benchmark model) it times, with
the ops interleaved round by round:

* reduce side: ``all_reduce`` (keep your slice), ``reduce_scatter_tensor``, ``reduce`` x N
  (one per shard owner, launched together), and ``SendRecv.reduce`` (comm.py: direct
  isend/irecv of each chunk to its owner, then a local sum);
* gather side: ``broadcast`` x N (one per owner, launched together), ``all_gather_into_tensor``,
  ``SendRecv.gather`` (each shard sent to every peer, received in place);

and adds up the plans of comm.py (SendRecv, AllReduceBroadcast, ScatterGather) and
reduce x N + broadcast x N. ``all_reduce`` alone is DDP's whole communication. A time is the slowest rank's, the reported value the median.

``python benchmarks/comm_bench.py`` launches ``--nproc`` ranks with torchrun (gloo on CPU
unless a GPU/NPU backend is available or named); under a torchrun you start yourself it runs
as a rank, so ``torchrun --nproc-per-node 8 benchmarks/comm_bench.py --backend nccl`` works.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules, also when imported
from report import md_table  # noqa: E402
from runner import REPO, launch_torchrun, machine_facts, read_json, write_json  # noqa: E402

REDUCE_OPS = ("all_reduce", "reduce_scatter_tensor", "reduce_xN", "send_recv_reduce")
GATHER_OPS = ("broadcast_xN", "all_gather_into_tensor", "send_recv_gather")
PLANS = {
    "send_recv_reduce + send_recv_gather (SendRecv)": ("send_recv_reduce", "send_recv_gather"),
    "all_reduce + broadcast_xN (AllReduceBroadcast)": ("all_reduce", "broadcast_xN"),
    "reduce_scatter_tensor + all_gather_into_tensor (ScatterGather)": ("reduce_scatter_tensor",
                                                                           "all_gather_into_tensor"),
    "reduce_xN + broadcast_xN": ("reduce_xN", "broadcast_xN"),
    "all_reduce only (DDP)": ("all_reduce",),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--numel", type=int, default=16_798_720, help="elements in the flat buffer")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    p.add_argument("--iters", type=int, default=10, help="timed rounds (every op once per round)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--nproc", type=int, default=2, help="ranks to launch (parent mode)")
    p.add_argument("--backend", choices=("auto", "gloo", "nccl", "hccl"), default="auto",
                   help="auto: hccl if torch_npu sees an NPU, nccl if CUDA is available, else gloo")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    p.add_argument("--tag", default="gloo2")
    p.add_argument("--results-dir", type=Path, default=REPO / "benchmarks" / "results")
    p.add_argument("--timeout", type=float, default=1800.0)
    args = p.parse_args(argv)
    if args.numel < 1 or args.iters < 1 or args.warmup < 0:
        p.error("--numel and --iters must be >= 1, --warmup >= 0")
    return args


def _pick_backend(requested: str) -> str:
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "nccl"
    if os.environ.get("ASCEND_RT_VISIBLE_DEVICES") is not None or os.path.exists("/dev/davinci0"):
        return "hccl"
    return "gloo"


def _device(backend: str, local_rank: int) -> torch.device:
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if backend == "hccl":
        import torch_npu  # noqa: F401  (only where an NPU was asked for)

        torch.npu.set_device(local_rank)
        return torch.device("npu", local_rank)
    return torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize(device)


def _ops(flat: torch.Tensor, rank: int, world_size: int) -> dict[str, Callable[[], None]]:
    """Each op as a closure that starts its collectives and waits for them."""
    from sharded_fused_adam.comm.plans import CommCounter, SendRecv

    shard = flat.numel() // world_size
    out = torch.empty(shard, dtype=flat.dtype, device=flat.device)
    pieces = [flat.narrow(0, r * shard, shard) for r in range(world_size)]
    send_recv = SendRecv(None, rank, world_size, CommCounter())

    def wait_all(works: list) -> None:
        for w in works:
            w.wait()

    return {
        "all_reduce": lambda: dist.all_reduce(flat),
        "reduce_scatter_tensor": lambda: dist.reduce_scatter_tensor(out, flat),
        "reduce_xN": lambda: wait_all([dist.reduce(pieces[r], dst=r, async_op=True) for r in range(world_size)]),
        "broadcast_xN": lambda: wait_all([dist.broadcast(pieces[r], src=r, async_op=True)
                                          for r in range(world_size)]),
        "all_gather_into_tensor": lambda: dist.all_gather_into_tensor(flat, pieces[rank]),
        "send_recv_reduce": lambda: send_recv.reduce(flat, out).wait(),
        "send_recv_gather": lambda: send_recv.gather(flat).wait(),
    }


def rank_main(args: argparse.Namespace) -> None:
    backend = _pick_backend(args.backend)
    torch.set_num_threads(args.threads)
    device = _device(backend, int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    numel = -(-args.numel // world_size) * world_size  # padded to a multiple of the world size
    flat = torch.ones(numel, dtype=DTYPES[args.dtype], device=device)
    ops = _ops(flat, rank, world_size)
    samples: dict[str, list[float]] = {name: [] for name in ops}
    clock = torch.zeros(len(ops), dtype=torch.float64, device=device)
    for it in range(args.warmup + args.iters):
        for i, (name, op) in enumerate(ops.items()):
            flat.fill_(1.0)  # keep values finite and the same every time
            _sync(device)
            dist.barrier()
            t0 = time.perf_counter()
            op()
            _sync(device)
            clock[i] = time.perf_counter() - t0
        dist.all_reduce(clock, op=dist.ReduceOp.MAX)  # a round takes its slowest rank's time
        if it >= args.warmup:
            for i, name in enumerate(ops):
                samples[name].append(float(clock[i]))
    if rank == 0:
        path = args.results_dir / f"comm_{args.tag}.json"
        result = {"backend": backend, "device": str(device), "world_size": world_size, "numel": numel,
                  "dtype": args.dtype, "threads": args.threads, "iters": args.iters,
                  "median_ms": {k: statistics.median(v) * 1e3 for k, v in samples.items()},
                  "samples_ms": {k: [x * 1e3 for x in v] for k, v in samples.items()}, "facts": machine_facts()}
        write_json(path, result)
        (args.results_dir / f"comm_{args.tag}.md").write_text(markdown(result))
        print(markdown(result))
    dist.destroy_process_group()


def markdown(result: dict) -> str:
    med = result["median_ms"]
    nbytes = result["numel"] * torch.empty((), dtype=DTYPES[result["dtype"]]).element_size()
    rows = [[name, f"{med[name]:.1f}", f"{nbytes / med[name] / 1e6:.2f}", f"{med[name] / med['all_reduce']:.2f}"]
            for name in (*REDUCE_OPS, *GATHER_OPS)]
    plans = [[plan, " + ".join(parts), f"{sum(med[p] for p in parts):.1f}"] for plan, parts in PLANS.items()]
    return (f"# Collectives on {result['backend']} ({result['device']}), {result['world_size']} ranks, "
            f"{result['numel']:,} {result['dtype']} elements, {result['threads']} thread(s) per rank\n\n"
            f"Medians of {result['iters']} interleaved rounds (each round: the slowest rank). "
            f"Load average {result['facts']['loadavg'][0]:.2f}.\n\n"
            + md_table(["op", "median ms", "buffer GB/s", "x all_reduce"], rows)
            + "\nA whole ZeRO step's communication, per plan:\n\n"
            + md_table(["plan", "ops", "median ms (sum)"], plans))


def _without_nproc(argv: list[str]) -> list[str]:
    """The arguments for the ranks: torchrun would read ``--nproc`` as its own (ambiguous) option."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if "RANK" in os.environ:
        rank_main(args)
        return
    forwarded = _without_nproc(list(argv if argv is not None else sys.argv[1:]))
    path = args.results_dir / f"comm_{args.tag}.json"
    path.unlink(missing_ok=True)
    proc = launch_torchrun(Path(__file__).resolve(), forwarded, nproc=args.nproc, timeout_s=args.timeout)
    if proc.returncode != 0 or not path.exists():
        raise RuntimeError(f"torchrun exited with {proc.returncode}:\n{(proc.stdout + proc.stderr)[-6000:]}")
    print(markdown(read_json(path)))


if __name__ == "__main__":
    main()

"""Peak memory and time of ``sharded-fused-adam-checkpoint convert`` on a fabricated DeepSpeed checkpoint.

Fabricates a ZeRO-2 engine checkpoint of ``--params-b`` billion parameters (a bf16 module, fp32
masters and Adam moments partitioned over ``--world-size`` dp ranks, written straight to disk
by the same streamed writer the converter uses, so fabricating needs no RAM either), then runs
conversions in child processes and reports each child's peak RSS (``wait4``'s ru_maxrss) and
wall time. Needs about 15 bytes per parameter of disk per checkpoint (fp32 x 3 + bf16 weights)::

    python benchmarks/convert_memory.py --params-b 1.0 --dir /tmp/convert_bench   # ~45 GB, a few minutes
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from sharded_fused_adam.checkpoint.convert.deepspeed_write import write_deepspeed
from sharded_fused_adam.checkpoint.convert.state import NamedState, ParamState, Piece, StateTensor


class _Pattern:
    """Deterministic, cheap values for one fabricated tensor (element i of param p is p + i * 1e-9 + salt)."""

    def __init__(self, base: float):
        self.base = base

    def read(self, start: int, end: int, out: torch.Tensor | None = None) -> torch.Tensor:
        value = torch.arange(start, end, dtype=torch.float64).mul_(1e-9).add_(self.base).float()
        return value if out is None else out.copy_(value)


def fabricate(folder: Path, *, numel: int, num_params: int, world_size: int) -> NamedState:
    """A ZeRO-2 checkpoint of ``num_params`` square-ish fp32 params totalling about ``numel``."""
    side = int((numel / num_params) ** 0.5)
    shape = torch.Size([side, side])
    params, module = {}, {}
    for p in range(num_params):
        name = f"layers.{p}.weight"
        tensors = {k: StateTensor(shape.numel(), torch.float32, (Piece(0, shape.numel(), _Pattern(p + salt)),), "fab")
                   for k, salt in (("exp_avg", 0.1), ("exp_avg_sq", 0.2))}
        params[name] = ParamState(name, shape, 100, tensors, "fabricated")
        module[name] = torch.zeros(shape, dtype=torch.bfloat16)  # ~2 bytes/param of real RAM while fabricating
    weights = {n: StateTensor(shape.numel(), torch.float32, (Piece(0, shape.numel(), _Pattern(i + 0.3)),), "fab")
               for i, n in enumerate(params)}
    state = NamedState(params, [{"lr": 1e-4, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1, "amsgrad": False,
                                 "decoupled_weight_decay": True, "params": list(params)}], "fabricated", weights,
                       {"global_steps": 100})
    write_deepspeed(state, folder, world_size=world_size, stage=2, module=module, tag="global_step100")
    return state


# The child reports its own VmHWM: getrusage's ru_maxrss of a child also counts the pages it
# shared with this parent between fork and exec.
_CHILD = ("import sys; from sharded_fused_adam.checkpoint.cli import main; rc = main(sys.argv[1:]); "
          "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM'))); sys.exit(rc)")


def run_child(args: list[str]) -> dict:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", _CHILD, *args, "--no-progress"], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{args} failed:\n{done.stdout}\n{done.stderr}")
    hwm_kib = int(next(line for line in done.stdout.splitlines() if line.startswith("VmHWM")).split()[1])
    return {"seconds": round(time.monotonic() - started, 1), "peak_rss_mib": round(hwm_kib / 1024)}


def du(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params-b", type=float, default=1.0)
    parser.add_argument("--num-params", type=int, default=64)
    parser.add_argument("--world-size", type=int, default=8)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--keep", action="store_true", help="do not delete the files afterwards")
    args = parser.parse_args()
    root = args.dir
    shutil.rmtree(root, ignore_errors=True)
    started = time.monotonic()
    state = fabricate(root / "ds", numel=int(args.params_b * 1e9), num_params=args.num_params, world_size=args.world_size)
    shapes = [p.shape for p in state.params.values()]
    del state  # the fabricated bf16 module is freed before any child starts
    results = [{"step": "fabricate deepspeed", "seconds": round(time.monotonic() - started, 1),
                "gib": round(du(root / "ds"), 1)}]
    for src_fmt, dst_fmt, src, dst, extra in (
            ("deepspeed", "ours", "ds", "ours", []),
            ("ours", "dcp", "ours", "dcp", []),
            ("deepspeed", "universal", "ds", "universal", []),
            ("ours", "deepspeed", "ours", "ds4", ["--world-size", "4", "--module", str(root / "module.pt")])):
        if dst_fmt == "deepspeed":  # ours holds no bf16 weights: DeepSpeed's module entry comes from a model file
            torch.save({f"layers.{p}.weight": torch.zeros(shape, dtype=torch.bfloat16)
                        for p, shape in enumerate(shapes)}, root / "module.pt")
        res = run_child(["convert", "--from", src_fmt, "--to", dst_fmt, str(root / src), str(root / dst), *extra])
        results.append({"step": f"{src_fmt} -> {dst_fmt}", **res, "gib_written": round(du(root / dst), 1)})
        print(json.dumps(results[-1]), flush=True)
        if dst in ("dcp", "universal", "ds4"):
            shutil.rmtree(root / dst)  # keep the disk in bounds
    print(json.dumps({"params": int(args.params_b * 1e9), "world_size": args.world_size, "results": results}))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

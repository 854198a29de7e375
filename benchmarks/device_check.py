"""Validate an installation on an NPU, a GPU or the CPU in one command, in under 5 minutes.

    python benchmarks/device_check.py              # picks npu, else cuda, else cpu
    python benchmarks/device_check.py --device npu --out device_check.json

It prints (and writes as JSON):
1. the environment: torch, torch_npu / CUDA versions, device name and count, backend;
2. the device test suite (``pytest tests/test_device.py --device X``): parity with
   ``torch.optim.Adam/AdamW(fused=True)`` on the same device, bf16 with fp32 masters,
   overflow skipping, GradScaler, state dicts, every available kernel against the reference;
3. kernel throughput as effective GB/s next to the device's copy bandwidth measured in the
   same run: each available kernel on one flat fp32 tensor (28 bytes/element: read param,
   grad, exp_avg, exp_avg_sq; write param, exp_avg, exp_avg_sq), and a full
   ``ShardedFusedAdam.step()`` on 1,000 fp32 params and on 1,000 bf16 params with fp32
   masters (30 bytes/element: the 28 above on the master plus the 2-byte bf16 param written back);
4. a verdict. On an NPU it also says which Adam kernel (``npu`` or ``torch_fused``) is faster,
   so the default can be chosen on evidence.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sharded_fused_adam import ShardedFusedAdam  # noqa: E402
from sharded_fused_adam.kernels import KERNEL_NAMES, select_kernel  # noqa: E402


def _pick_device(requested: str) -> str:
    if requested != "auto":
        return requested
    try:
        import torch_npu  # noqa: F401

        if torch.npu.is_available():
            return "npu"
    except (ImportError, OSError, RuntimeError):
        pass
    return "cuda" if torch.cuda.is_available() else "cpu"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize(device)


def _environment(device_type: str) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "device": device_type,
           "backend": {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}[device_type]}
    if device_type == "cuda":
        env.update(cuda=torch.version.cuda, device_count=torch.cuda.device_count(),
                   device_name=torch.cuda.get_device_name(0))
    elif device_type == "npu":
        import torch_npu

        env.update(torch_npu=getattr(torch_npu, "__version__", "?"), device_count=torch.npu.device_count(),
                   device_name=torch.npu.get_device_name(0))
    else:
        env.update(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                   cpu_capability=torch.backends.cpu.get_cpu_capability())
    return env


def _time(fn: Callable[[], None], device: torch.device, repeats: int) -> float:
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _kernel_throughput(device: torch.device, numel: int, repeats: int) -> dict:
    gb = 1e9
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    copy_s = _time(lambda: dst.copy_(src), device, repeats)
    out = {"numel": numel, "copy_GBps": 8 * numel / copy_s / gb, "kernels": {}}
    del dst
    for name in KERNEL_NAMES:
        kernel = select_kernel(name, device) if name != "npu" or device.type == "npu" else None
        if kernel is None or kernel.name != name:
            continue
        p, g, m = (torch.randn(numel, device=device) for _ in range(3))
        v = torch.rand(numel, device=device)
        counter = iter(range(1, 10**6))

        def run() -> None:
            kernel.adam_step([p], [g], [m], [v], [], [next(counter)], lr=1e-4, beta1=0.9, beta2=0.999,
                             eps=1e-8, weight_decay=0.01, amsgrad=False, decoupled=True, maximize=False)

        seconds = _time(run, device, repeats)
        out["kernels"][name] = {"ms": seconds * 1e3, "GBps": 28 * numel / seconds / gb}
        del p, g, m, v
    for dtype, bytes_per in ((torch.float32, 28), (torch.bfloat16, 30)):
        params = [torch.nn.Parameter(torch.randn(numel // 1000, device=device, dtype=dtype)) for _ in range(1000)]
        opt = ShardedFusedAdam(params, lr=1e-4, bucket_cap_mb=2**20)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()  # moves the gradients into the optimizer; later steps reuse them

        seconds = _time(lambda: opt.step(), device, repeats)
        key = "sharded_step_fp32" if dtype == torch.float32 else "sharded_step_bf16_master"
        out[key] = {"ms": seconds * 1e3, "GBps": bytes_per * (numel // 1000 * 1000) / seconds / gb,
                    "kernel": opt._kernel.name}
        del opt, params
    return out


def _run_tests(device_type: str) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_device.py"),
           "--device", device_type, "-rs"]
    started = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    tail = (result.stdout + result.stderr).strip().splitlines()[-15:]
    return {"passed": result.returncode == 0, "seconds": round(time.perf_counter() - started, 1),
            "command": " ".join(cmd[1:]), "summary": tail}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["auto", "npu", "cuda", "cpu"], default="auto")
    parser.add_argument("--numel", type=int, default=None, help="elements per kernel tensor "
                        "(default 256M on an accelerator, 16M on CPU)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--skip-tests", action="store_true", help="only the environment and throughput")
    parser.add_argument("--out", type=Path, default=None, help="also write the report as JSON here")
    args = parser.parse_args(argv)
    device_type = _pick_device(args.device)
    device = torch.device(device_type, 0) if device_type != "cpu" else torch.device("cpu")
    numel = args.numel or (2**28 if device_type != "cpu" else 2**24)
    report = {"environment": _environment(device_type)}
    print(json.dumps(report["environment"], indent=2), flush=True)
    report["tests"] = None if args.skip_tests else _run_tests(device_type)
    if report["tests"]:
        print("\n".join(report["tests"]["summary"]), flush=True)
    report["throughput"] = _kernel_throughput(device, numel, args.repeats)
    thr = report["throughput"]
    print(f"\ncopy bandwidth {thr['copy_GBps']:.0f} GB/s (read+write)")
    for name, k in thr["kernels"].items():
        print(f"  kernel {name:12s} {k['ms']:8.2f} ms  {k['GBps']:7.0f} GB/s  "
              f"({k['GBps'] / thr['copy_GBps']:.0%} of copy)")
    for key in ("sharded_step_fp32", "sharded_step_bf16_master"):
        k = thr[key]
        print(f"  {key:24s} {k['ms']:8.2f} ms  {k['GBps']:7.0f} GB/s  ({k['kernel']} kernel)")
    verdict = "PASS" if (report["tests"] is None or report["tests"]["passed"]) else "FAIL"
    if "npu" in thr["kernels"] and "torch_fused" in thr["kernels"]:
        faster = min(("npu", "torch_fused"), key=lambda n: thr["kernels"][n]["ms"])
        report["faster_npu_kernel"] = faster
        print(f"faster Adam kernel on this NPU: {faster}")
    report["verdict"] = verdict
    print(f"\nverdict: {verdict}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())

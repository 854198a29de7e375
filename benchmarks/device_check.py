"""Validate an installation on an NPU, a GPU or the CPU: one command, one report file.

    python benchmarks/device_check.py                      # npu if present, else cuda, else cpu
    python benchmarks/device_check.py --device npu --out device_check_npu.json
    TORCH_NPU_FALLBACK_CPU_DISABLE=1 python benchmarks/device_check.py --device npu
    python benchmarks/device_check.py --device npu --emulated   # the emulated NPU of tests/ (no hardware)

The report (printed, and written as JSON to ``--out``) holds:
1. ``environment``: python, torch, torch_npu / CUDA versions, device name and count, backend,
   and the environment variables that change NPU behaviour;
2. ``tests``: ``pytest tests/test_device.py --device X`` (one rank per local device);
3. ``kernels``: the device's copy bandwidth, then effective GB/s (28 bytes/element) of the raw
   ops ``torch._fused_adam_`` and ``torch._fused_adamw_`` separately and of each kernel
   (``torch_fused``, ``npu``, ``reference``) for classic Adam and AdamW, on one flat fp32 tensor;
4. ``steps``: ``ShardedFusedAdam.step()`` against ``torch.optim.AdamW(fused=True)`` on 1,000
   fp32 params and on 1,000 bf16 params (ours with fp32 masters);
5. ``memory``: ``max_memory_allocated`` after a step against ``memory_report()`` and the
   per-parameter formula (16 bytes/param for fp32, 18 for bf16 with masters, one rank);
6. ``fallback_warnings``: every "fall back to run on the CPU" warning seen during 3-5 (the raw
   ops run last, each marked ``fell_back_to_cpu``: on an NPU ``_fused_adam_`` is expected to);
7. ``hang``: two ranks, one of which never joins the step's collectives; how long the other
   takes to raise ``CollectiveError`` with ``collective_timeout=5`` (needs 2 devices);
8. ``verdict``: FAIL if the tests failed, a fallback warning appeared, or the hang was not
   bounded by 5 s + the 5 s probe + 5 s of slack.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sharded_fused_adam import CollectiveError, ShardedFusedAdam  # noqa: E402
from sharded_fused_adam.kernels import KERNEL_NAMES, select_kernel  # noqa: E402

GB = 1e9
_ENV_VARS = ("TORCH_NPU_FALLBACK_CPU_DISABLE", "TORCH_HCCL_BLOCKING_WAIT", "ASCEND_RT_VISIBLE_DEVICES",
             "HCCL_CONNECT_TIMEOUT", "HCCL_EXEC_TIMEOUT", "HCCL_BUFFSIZE", "CUDA_VISIBLE_DEVICES")
BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}
_FALLBACK = "fall back to run on the CPU"


def _use_emulated_npu() -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    import emulated_npu

    reason = emulated_npu.prepare()
    if reason:
        sys.exit(f"device_check: the emulated NPU cannot run here: {reason}")
    emulated_npu.activate()


def _pick_device(requested: str) -> str:
    if requested != "auto":
        if requested == "npu":
            import torch_npu  # noqa: F401  (fails loudly where it is missing)
        return requested
    try:
        import torch_npu  # noqa: F401

        if torch.npu.is_available():
            return "npu"
    except (ImportError, OSError, RuntimeError):
        pass
    return "cuda" if torch.cuda.is_available() else "cpu"


def _module(device_type: str):
    return getattr(torch, device_type) if device_type != "cpu" else None


def _sync(device: torch.device) -> None:
    if device.type != "cpu":
        _module(device.type).synchronize(device)


def _environment(device_type: str) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "device": device_type,
           "backend": BACKENDS[device_type], "env": {k: os.environ[k] for k in _ENV_VARS if k in os.environ}}
    if device_type == "cuda":
        env.update(cuda=torch.version.cuda, device_count=torch.cuda.device_count(),
                   device_name=torch.cuda.get_device_name(0))
    elif device_type == "npu":
        import torch_npu

        env.update(torch_npu=getattr(torch_npu, "__version__", "?"), device_count=torch.npu.device_count(),
                   device_name=torch.npu.get_device_name(0), emulated=getattr(torch_npu, "EMULATED", False))
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


def _state(numel: int, device: torch.device) -> list[torch.Tensor]:
    p, g, m = (torch.randn(numel, device=device) for _ in range(3))
    return [p, g, m, torch.rand(numel, device=device)]


def _raw_op(name: str, device: torch.device, numel: int, repeats: int) -> dict:
    p, g, m, v = _state(numel, device)
    step = torch.ones((), device=device)
    op = getattr(torch, name)

    def run() -> None:
        op([p], [g], [m], [v], [], [step], lr=1e-4, beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-8,
           amsgrad=False, maximize=False)

    try:
        seconds = _time(run, device, repeats)
    except (RuntimeError, NotImplementedError) as exc:
        return {"error": str(exc).splitlines()[0]}
    return {"ms": seconds * 1e3, "GBps": 28 * numel / seconds / GB}


def _kernels(device: torch.device, numel: int, repeats: int) -> dict:
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    out = {"numel": numel, "copy_GBps": 8 * numel / _time(lambda: dst.copy_(src), device, repeats) / GB}
    del src, dst
    out["kernels"] = {}
    for name in KERNEL_NAMES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            kernel = select_kernel(name, device)
        if kernel.name != name:
            out["kernels"][name] = {"unavailable": f"falls back to {kernel.name}"}
            continue
        for decoupled in (False, True):
            p, g, m, v = _state(numel, device)
            steps = iter(range(1, 10**6))

            def run() -> None:
                kernel.adam_step([p], [g], [m], [v], [], [next(steps)], lr=1e-4, beta1=0.9, beta2=0.999,
                                 eps=1e-8, weight_decay=0.01, amsgrad=False, decoupled=decoupled, maximize=False)

            seconds = _time(run, device, repeats)
            key = f"{name}/{'adamw' if decoupled else 'adam'}"
            out["kernels"][key] = {"ms": seconds * 1e3, "GBps": 28 * numel / seconds / GB}
    return out


def _params(numel: int, dtype: torch.dtype, device: torch.device) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(numel // 1000, generator=gen).to(device, dtype)) for _ in range(1000)]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def _peak_since(device: torch.device, fn: Callable[[], object]) -> tuple[object, int | None]:
    module = _module(device.type)
    if module is None or not hasattr(module, "max_memory_allocated"):
        return fn(), None
    _sync(device)
    module.reset_peak_memory_stats(device)
    result = fn()
    _sync(device)
    return result, module.max_memory_allocated(device)


def _steps(device: torch.device, numel: int, repeats: int) -> tuple[dict, dict]:
    steps, memory = {}, {}
    for label, dtype, formula in (("fp32", torch.float32, 16), ("bf16_master", torch.bfloat16, 18)):
        def build() -> ShardedFusedAdam:
            opt = ShardedFusedAdam(_params(numel, dtype, device), lr=1e-4, bucket_cap_mb=2**20, adamw=True)
            opt.step()  # moves the gradients into the optimizer; later steps reuse them
            return opt

        opt, peak = _peak_since(device, build)
        report = opt.memory_report()
        memory[label] = {"max_memory_allocated": peak, "memory_report_total": report.total,
                         "formula_bytes": formula * report.num_params, "report": report.as_dict()}
        ours = _time(lambda: opt.step(), device, repeats)
        del opt
        params = _params(numel, dtype, device)
        ref = torch.optim.AdamW(params, lr=1e-4, fused=True)
        theirs = _time(lambda: ref.step(), device, repeats)
        steps[label] = {"ours_ms": ours * 1e3, "torch_adamw_fused_ms": theirs * 1e3, "ratio": ours / theirs}
        del ref, params
    return steps, memory


def _hang_rank(rank: int, store_path: str, device_type: str, emulated: bool, queue) -> None:
    try:
        _hang_rank_body(rank, store_path, device_type, emulated, queue)
    except BaseException as exc:  # noqa: BLE001  (reported, not lost in a child's stderr)
        queue.put({"raised": False, "seconds": None, "message": f"rank {rank} failed: {exc!r}"})
    queue.close()
    queue.join_thread()  # flush before leaving without the group's teardown
    os._exit(0)  # the group is abandoned after a CollectiveError (docs/troubleshooting.md)


def _hang_rank_body(rank: int, store_path: str, device_type: str, emulated: bool, queue) -> None:
    import torch.distributed as dist

    if emulated:
        _use_emulated_npu()
    if device_type == "npu":
        import torch_npu  # noqa: F401  (registers torch.npu and hccl)
    if device_type != "cpu":
        _module(device_type).set_device(rank)
    dist.init_process_group(BACKENDS[device_type], store=dist.FileStore(store_path, 2), rank=rank, world_size=2,
                            timeout=timedelta(seconds=120))
    device = torch.device(device_type, rank) if device_type != "cpu" else torch.device("cpu")
    params = [torch.nn.Parameter(torch.randn(1024, device=device))]
    opt = ShardedFusedAdam(params, lr=1e-3, collective_timeout=5)
    if rank == 1:
        time.sleep(25)  # never joins the step; stays alive past the other rank's timeout
        return
    params[0].grad = torch.ones_like(params[0])
    started = time.monotonic()
    try:
        opt.step()
        queue.put({"raised": False, "seconds": time.monotonic() - started})
    except CollectiveError as exc:
        queue.put({"raised": True, "seconds": time.monotonic() - started, "message": str(exc)[:400]})


def _hang(device_type: str, emulated: bool) -> dict:
    count = 2 if device_type == "cpu" else _module(device_type).device_count()
    if count < 2:
        return {"skipped": f"needs 2 {device_type} devices, found {count}"}
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_hang_rank, args=(r, os.path.join(tmp, "store"), device_type, emulated, queue))
                 for r in range(2)]
        for p in procs:
            p.start()
        try:
            result = queue.get(timeout=90)
        except Exception as exc:  # noqa: BLE001  (a hang the timeout did not bound)
            result = {"raised": False, "seconds": None, "message": f"no result within 90 s ({exc!r})"}
        for p in procs:
            p.join(timeout=40)
            if p.is_alive():
                p.kill()
    result["bounded"] = bool(result.get("raised")) and result["seconds"] is not None and result["seconds"] < 15
    return result


def _run_tests(device_type: str) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_device.py"),
           "--device", device_type, "-rs"]
    started = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    tail = (result.stdout + result.stderr).strip().splitlines()[-15:]
    return {"passed": result.returncode == 0, "seconds": round(time.perf_counter() - started, 1),
            "command": " ".join(cmd[1:]), "summary": tail}


def _print_summary(report: dict) -> None:
    k = report["kernels"]
    print(f"\ncopy bandwidth {k['copy_GBps']:.1f} GB/s (read+write)")
    for name, r in {**k["ops"], **k["kernels"]}.items():
        text = f"{r['ms']:9.2f} ms {r['GBps']:8.1f} GB/s ({r['GBps'] / k['copy_GBps']:.0%} of copy)" \
            if "ms" in r else r.get("error") or r.get("unavailable")
        print(f"  {name:24s} {text}")
    for label, r in report["steps"].items():
        print(f"  step {label:19s} ours {r['ours_ms']:8.2f} ms, torch AdamW(fused) {r['torch_adamw_fused_ms']:8.2f} ms")
    for label, r in report["memory"].items():
        print(f"  memory {label:17s} peak {r['max_memory_allocated']}, memory_report {r['memory_report_total']}, "
              f"formula {r['formula_bytes']}")
    print(f"  fallback warnings: {report['fallback_warnings'] or 'none'}")
    print(f"  hang: {report['hang']}")
    if "faster_npu_kernel" in report:
        print(f"  faster Adam kernel on this NPU: {report['faster_npu_kernel']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["auto", "npu", "cuda", "cpu"], default="auto")
    parser.add_argument("--emulated", action="store_true", help="use the emulated NPU of tests/emulated_npu")
    parser.add_argument("--numel", type=int, default=None, help="elements per kernel tensor "
                        "(default 256M on an accelerator, 16M on the CPU or the emulated NPU)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--skip-tests", action="store_true", help="leave out the device test suite")
    parser.add_argument("--out", type=Path, default=None, help="report file (default device_check_<device>.json)")
    args = parser.parse_args(argv)
    if args.emulated:
        _use_emulated_npu()
    device_type = _pick_device("npu" if args.emulated else args.device)
    device = torch.device(device_type, 0) if device_type != "cpu" else torch.device("cpu")
    if device_type != "cpu":
        _module(device_type).set_device(0)
    numel = args.numel or (2**28 if device_type != "cpu" and not args.emulated else 2**24)
    report: dict = {"environment": _environment(device_type)}
    print(json.dumps(report["environment"], indent=2), flush=True)
    report["tests"] = None if args.skip_tests else _run_tests(device_type)
    if report["tests"]:
        print("\n".join(report["tests"]["summary"]), flush=True)
    with warnings.catch_warnings(record=True) as caught:  # ours first: torch_npu warns once per op
        warnings.simplefilter("always")
        report["kernels"] = _kernels(device, numel, args.repeats)
        report["steps"], report["memory"] = _steps(device, numel, args.repeats)
    report["fallback_warnings"] = sorted({str(w.message) for w in caught if _FALLBACK in str(w.message)})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report["kernels"]["ops"] = {name: _raw_op(name, device, numel, args.repeats)
                                    for name in ("_fused_adam_", "_fused_adamw_")}
    for name, r in report["kernels"]["ops"].items():
        r["fell_back_to_cpu"] = any(_FALLBACK in str(w.message) and f"{name}'" in str(w.message) for w in caught)
    kernels = report["kernels"]["kernels"]
    if device_type == "npu" and "ms" in kernels.get("npu/adamw", {}) and "ms" in kernels.get("torch_fused/adamw", {}):
        report["faster_npu_kernel"] = min(("npu", "torch_fused"), key=lambda n: kernels[f"{n}/adamw"]["ms"])
    report["hang"] = _hang(device_type, args.emulated)
    _print_summary(report)
    ok = [report["tests"] is None or report["tests"]["passed"], not report["fallback_warnings"],
          "skipped" in report["hang"] or report["hang"]["bounded"]]
    report["verdict"] = "PASS" if all(ok) else "FAIL"
    print(f"\nverdict: {report['verdict']}")
    out = args.out or Path(f"device_check_{device_type}{'_emulated' if args.emulated else ''}.json")
    out.write_text(json.dumps(report, indent=2, default=str))
    print(f"report: {out}")
    return 0 if report["verdict"] == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())

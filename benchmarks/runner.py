"""Shared plumbing for the multi-rank benchmarks: launching torchrun, rank set-up, RSS and JSON I/O."""
from __future__ import annotations

import importlib.metadata
import json
import os
import resource
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parents[1]

__all__ = ["REPO", "child_env", "launch_torchrun", "init_rank", "current_rss", "peak_rss", "write_json",
           "read_json", "machine_facts"]

_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                  "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def child_env() -> dict[str, str]:
    """The environment for benchmark ranks: one OpenMP thread, DeepSpeed on its CPU accelerator.

    ``DS_ACCELERATOR`` and ``TORCH_EXTENSIONS_DIR`` are only set when the caller has not set
    them; the extensions cache defaults to ``<repo>/.cache/torch_extensions`` (git-ignored),
    so DeepSpeed compiles its C++ ops once per checkout, not once per run.
    """
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS}
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_torchrun(script: Path, args: Sequence[str], *, nproc: int, timeout_s: float) -> subprocess.CompletedProcess:
    """Run ``script args`` on ``nproc`` local ranks under ``torch.distributed.run``; output is captured.

    The caller checks what the ranks wrote, not only the exit code: DeepSpeed ranks
    occasionally abort at interpreter exit after finishing ("terminate called without an
    active exception", seen in about 2 of 35 runs of DeepSpeed 0.19.8 on CPU here).
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(script), *args]
    return subprocess.run(cmd, env=child_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout_s)


def init_rank() -> tuple[int, int]:
    """Inside a torchrun rank: one intra-op thread, a gloo process group; returns (rank, world_size)."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def current_rss() -> int:
    """Resident set size of this process now, in bytes (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.replace(path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def machine_facts() -> dict[str, Any]:
    """Versions and the load average: the context a reader needs to judge the numbers."""
    import torch

    facts: dict[str, Any] = {"torch": torch.__version__, "python": sys.version.split()[0],
                             "cpu_count": os.cpu_count(), "loadavg": list(os.getloadavg())}
    try:
        facts["deepspeed"] = importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError:  # optional: the DeepSpeed anchors need it
        facts["deepspeed"] = None
    return facts

"""Test harness: run a function on N real gloo ranks (one process each) and collect results.

[Note: rank harness]
Every multi-rank test goes through :func:`run_ranks`. Ranks are forked from a forkserver
that has imported torch once, so a rank starts in well under a second. Ranks rendezvous
through a ``FileStore`` inside pytest's ``tmp_path`` (no ports, no races between tests),
run with one intra-op thread each (2 cores here), and always destroy their process group.
The parent enforces a hard timeout; the first failing rank's traceback is re-raised with
its rank, and the remaining ranks (likely blocked in a collective) are killed.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import pytest
import torch

_CTX = mp.get_context("forkserver")
# torch.optim.Optimizer.__init__ imports torch._dynamo lazily (~3 s): pay it once, in the server.
_CTX.set_forkserver_preload(["torch", "torch.distributed", "torch._dynamo", "torch.optim", "sharded_fused_adam"])


class RankFailed(AssertionError):
    """A rank raised: carries the rank's own traceback."""


def _set_device(device_type: str, rank: int) -> None:
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    elif device_type == "npu":
        import emulated_npu

        emulated_npu.activate()  # the stand-in torch_npu where no real one is installed
        import torch_npu  # noqa: F401

        torch.npu.set_device(rank)


def _rank_main(
    rank: int,
    world_size: int,
    store_path: str,
    fn: Callable[..., Any],
    args: tuple,
    results: Any,
    timeout_s: float,
    device_type: str,
) -> None:
    import torch.distributed as dist

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world_size)
    try:
        _set_device(device_type, rank)  # HCCL/NCCL bind to the current device: before init
        dist.init_process_group(
            BACKENDS[device_type],
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        out = fn(rank, world_size, *args)
        # Plain pickle copies tensor data; the queue's own pickler would share storage
        # through file descriptors that vanish when this process exits.
        results.put(("ok", rank, pickle.dumps(out)))
    except BaseException:  # report everything, including assertion failures
        results.put(("error", rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


BACKENDS = {"cpu": "gloo", "cuda": "nccl", "npu": "hccl"}


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    tmp_path: Any,
    timeout_s: float = 120.0,
    device_type: str = "cpu",
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` ranks (gloo; nccl/hccl with a device).

    ``fn`` must be a module-level function (it is pickled by reference).

    Returns:
        The per-rank return values, indexed by rank.

    Raises:
        RankFailed: a rank raised; the message holds that rank's traceback.
        TimeoutError: the ranks did not all finish within ``timeout_s``.
    """
    store_path = os.path.join(str(tmp_path), f"store_{time.monotonic_ns()}")
    results = _CTX.Queue()
    procs = [
        _CTX.Process(
            target=_rank_main,
            args=(rank, world_size, store_path, fn, args, results, timeout_s, device_type),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    outputs: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(outputs) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(outputs))
                raise TimeoutError(f"ranks {missing} did not finish within {timeout_s:.0f} s")
            try:
                status, rank, payload = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in outputs]
                if dead and all(not p.is_alive() for p in procs):
                    raise RankFailed(f"ranks {dead} exited without reporting (exit codes "
                                     f"{[procs[r].exitcode for r in dead]})")
                continue
            if status == "error":
                raise RankFailed(f"rank {rank} of {world_size} failed:\n{payload}")
            outputs[rank] = pickle.loads(payload)
    finally:
        for p in procs:
            p.join(timeout=10)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return [outputs[r] for r in range(world_size)]


@pytest.fixture
def ranks(tmp_path):
    """``ranks(fn, world_size, *args)`` runs ``fn`` on real gloo ranks (see [Note: rank harness])."""

    def _run(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 120.0):
        return run_ranks(fn, world_size, *args, tmp_path=tmp_path, timeout_s=timeout_s)

    return _run


# ---- device selection (see tests/test_device.py) -------------------------------------------

def pytest_addoption(parser):
    parser.addoption("--device", choices=sorted(BACKENDS), default=os.environ.get("SFA_TEST_DEVICE"),
                     help="device for tests/test_device.py (env SFA_TEST_DEVICE): cpu+gloo, cuda+nccl or "
                          "npu+hccl, one rank per local device. Default: cpu and npu, where npu is the "
                          "emulated NPU of tests/emulated_npu unless a real torch_npu is installed")


def pytest_generate_tests(metafunc):
    """Run the device tests once per device: the one asked for, else cpu and the (emulated) npu."""
    if "device_type" in metafunc.fixturenames:
        asked = metafunc.config.getoption("--device")
        metafunc.parametrize("device_type", [asked] if asked else ["cpu", "npu"], indirect=True, scope="session")


def _device_count(device_type: str) -> tuple[int, str]:
    """Local devices of ``device_type`` and, if none, why not."""
    if device_type == "cpu":
        return 2, ""
    if device_type == "cuda":
        return (torch.cuda.device_count(), "torch.cuda.is_available() is False") if torch.cuda.is_available() \
            else (0, "torch.cuda.is_available() is False")
    import emulated_npu

    if not emulated_npu.real_torch_npu_installed():  # never imported here: [Note: the emulated NPU ...]
        reason = emulated_npu.prepare()
        return (0, reason) if reason else (emulated_npu.device_count(), "")
    try:
        import torch_npu  # noqa: F401
    except (ImportError, OSError, RuntimeError) as exc:
        return 0, f"torch_npu cannot be imported ({exc})"
    return (torch.npu.device_count(), "no NPU is visible") if torch.npu.is_available() else (0, "no NPU is visible")


@pytest.fixture(scope="session")
def device_type(request) -> str:
    """The device the device tests run on; they fail (not skip) if it was asked for and is absent.

    Unasked, the npu run is skipped only where the emulated NPU cannot be built (no compiler)."""
    kind = request.param
    count, why = _device_count(kind)
    if count == 0:
        if request.config.getoption("--device") is None:
            pytest.skip(f"the {kind} device tests cannot run here: {why}")
        pytest.fail(f"--device {kind} was requested but {why}", pytrace=False)
    return kind


@pytest.fixture
def device_ranks(tmp_path, device_type):
    """``device_ranks(fn, *args)`` runs ``fn(rank, world_size, device_type, *args)`` on one rank
    per local device (2 gloo ranks on CPU)."""
    world_size = _device_count(device_type)[0]

    def _run(fn: Callable[..., Any], *args: Any, timeout_s: float = 180.0):
        return run_ranks(fn, world_size, device_type, *args, tmp_path=tmp_path, timeout_s=timeout_s,
                         device_type=device_type)

    return _run

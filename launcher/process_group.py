"""``init_distributed``: one call that turns whatever launched this process into a process group.

[Note: single-rank process group]
A plain ``python train.py`` (no launcher variables) still gets a real 1-rank process group,
so code that calls collectives runs unchanged. Its store is an in-memory ``HashStore``: no
port is opened, so nothing can clash with another job on the machine and nothing can time
out. The same holds for any 1-rank job that names no MASTER_ADDR.

[Note: rendezvous timeout]
Two timeouts: ``rendezvous_timeout`` bounds how long ranks wait for each other at start-up
(a missing rank fails fast with the address and port in the message); ``timeout`` is the
process group's collective timeout (a slow rank mid-training must not kill the job). The
store is built here rather than through ``init_method`` so that each can have its own.
Under torchrun the agent already hosts the store (``TORCHELASTIC_USE_AGENT_STORE=True``),
so every rank, rank 0 included, connects to it as a client.
"""
from __future__ import annotations

import os
import sys
import weakref
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Mapping, Union

import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout

from launcher.device import DevicePlan, choose_device, probe_accelerators, resolve_request, set_current_device
from launcher.env import DistEnv, parse_env
from launcher.errors import RendezvousError

__all__ = ["DEFAULT_RENDEZVOUS_TIMEOUT_S", "init_distributed"]

DEFAULT_RENDEZVOUS_TIMEOUT_S = 600.0

Timeout = Union[float, timedelta, None]


@dataclass(frozen=True)
class _Initialized:
    """What the first successful call set up; later calls return its device."""

    dist_env: DistEnv
    plan: DevicePlan
    device: torch.device
    # A weak reference to dist.group.WORLD: tells our group from one made after a destroy. A
    # strong one would keep a destroyed group alive until interpreter shutdown, where tearing
    # down its threads aborts the process ("terminate called without an active exception").
    group: weakref.ref


_initialized: _Initialized | None = None


def _seconds(value: Timeout, *, what: str) -> float | None:
    if value is None:
        return None
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if not seconds > 0:
        raise ValueError(f"{what} must be > 0 seconds, got {value!r}")
    return seconds


def _rendezvous_seconds(rendezvous_timeout: Timeout, timeout_s: float | None, environ: Mapping[str, str]) -> float:
    """The start-up bound: the argument, else SFA_RENDEZVOUS_TIMEOUT, else min(timeout, default)."""
    explicit = _seconds(rendezvous_timeout, what="rendezvous_timeout")
    if explicit is not None:
        return explicit
    raw = environ.get("SFA_RENDEZVOUS_TIMEOUT")
    if raw:
        try:
            seconds = float(raw)
        except ValueError:
            seconds = float("nan")
        if not seconds > 0:
            raise ValueError(f"SFA_RENDEZVOUS_TIMEOUT must be a number of seconds > 0, got {raw!r}")
        return seconds
    return min(timeout_s or DEFAULT_RENDEZVOUS_TIMEOUT_S, DEFAULT_RENDEZVOUS_TIMEOUT_S)


def _resolve_master(dist_env: DistEnv) -> DistEnv:
    """Fill in an MPI job's missing rendezvous address by broadcast from rank 0."""
    if dist_env.world_size == 1 or (dist_env.master_addr and dist_env.master_port):
        return dist_env
    from launcher.mpi import broadcast_rendezvous

    addr, port = broadcast_rendezvous(
        dist_env.master_addr, dist_env.master_port,
        all_ranks_local=dist_env.local_world_size == dist_env.world_size,
    )
    return replace(dist_env, master_addr=addr, master_port=port)


def _hint(dist_env: DistEnv) -> str:
    if dist_env.source == "slurm":
        return ("Under sbatch, start one task per device with srun; a python started directly by the "
                "batch script is only one task, and the others never come.")
    if dist_env.rank == 0:
        return (f"Check that all {dist_env.world_size} ranks were started and that each can reach this "
                "address (MASTER_ADDR must be rank 0's host).")
    return "Check that rank 0 is running and that this host can reach its address (firewall, MASTER_ADDR)."


def _create_store(dist_env: DistEnv, rendezvous_s: float, environ: Mapping[str, str]) -> dist.Store:
    """Meet the other ranks (see [Note: rendezvous timeout]); HashStore for one rank without an address."""
    if dist_env.master_addr is None or dist_env.master_port is None:
        assert dist_env.world_size == 1, "parse_env/_resolve_master guarantee an address for several ranks"
        return dist.HashStore()  # see [Note: single-rank process group]
    agent_hosts_store = environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    try:
        return dist.TCPStore(
            dist_env.master_addr, dist_env.master_port, dist_env.world_size,
            is_master=dist_env.rank == 0 and not agent_hosts_store,
            timeout=timedelta(seconds=rendezvous_s), wait_for_workers=True, multi_tenant=True,
        )
    except RuntimeError as err:  # DistStoreError / DistNetworkError: timeouts, refused connections, bind errors
        raise RendezvousError(
            f"rendezvous failed: rank {dist_env.rank} of {dist_env.world_size} (source={dist_env.source!r}) did not "
            f"meet the other ranks at {dist_env.master_addr}:{dist_env.master_port} within {rendezvous_s:g} s. "
            f"{_hint(dist_env)} Underlying error: {err}"
        ) from err


def _export(dist_env: DistEnv) -> None:
    """Publish the layout in os.environ (unset names only) for libraries that read it, e.g. DeepSpeed."""
    values = {"RANK": dist_env.rank, "WORLD_SIZE": dist_env.world_size, "LOCAL_RANK": dist_env.local_rank,
              "LOCAL_WORLD_SIZE": dist_env.local_world_size, "MASTER_ADDR": dist_env.master_addr,
              "MASTER_PORT": dist_env.master_port}
    for name, value in values.items():
        if value is not None:
            os.environ.setdefault(name, str(value))


def _reuse(backend: str, device: str, environ: Mapping[str, str]) -> torch.device:
    """A process group exists already: keep it, check the request agrees, return this rank's device."""
    global _initialized
    requested_backend, requested_device = resolve_request(backend, device, environ)
    existing = dist.get_backend()
    if requested_backend not in ("auto", existing):
        raise ValueError(f"backend={requested_backend!r} was requested but the process group is already "
                         f"initialized with backend {existing!r}; call torch.distributed.destroy_process_group() first")
    if _initialized is None or _initialized.group() is not dist.group.WORLD:
        # Initialized by someone else (e.g. deepspeed.init_distributed): adopt it.
        dist_env = parse_env(environ, sys.argv[1:])
        plan = choose_device(existing, requested_device, local_rank=dist_env.local_rank,
                             accelerators=probe_accelerators(existing, requested_device))
        _initialized = _Initialized(dist_env, plan, set_current_device(plan), weakref.ref(dist.group.WORLD))
    if requested_device not in ("auto", _initialized.plan.device_type):
        raise ValueError(f"device={requested_device!r} was requested but this rank already uses "
                         f"{_initialized.device}; call torch.distributed.destroy_process_group() first")
    return _initialized.device


def init_distributed(
    backend: str = "auto",
    *,
    device: str = "auto",
    timeout: Timeout = None,
    rendezvous_timeout: Timeout = None,
) -> torch.device:
    """Initialize the default process group for however this process was launched.

    Works under torchrun, ``python -m launcher``, mpirun/mpiexec, SLURM srun, the deepspeed
    launcher and plain ``python`` (a 1-rank group; see [Note: single-rank process group]).
    The launcher is recognised from the environment (see [Note: launcher precedence] in
    ``launcher.env``). Calling it again returns the same device and does not re-initialize.

    Args:
        backend: ``"auto"`` (NPU->hccl, else CUDA->nccl, else gloo), ``"hccl"``, ``"nccl"`` or
            ``"gloo"``. ``"auto"`` defers to the ``SFA_BACKEND`` environment variable.
        device: ``"auto"`` (follows the backend), ``"npu"``, ``"cuda"`` or ``"cpu"``; ``"auto"``
            defers to ``SFA_DEVICE``.
        timeout: collective timeout of the process group, in seconds or a timedelta; None
            keeps torch's default for the backend.
        rendezvous_timeout: how long to wait for every rank at start-up; None means
            ``SFA_RENDEZVOUS_TIMEOUT`` if set, else ``min(timeout, 600 s)``.

    Returns:
        This rank's device (``npu:LOCAL_RANK``, ``cuda:LOCAL_RANK`` or ``cpu``), already
        made current.

    Raises:
        ValueError: launcher variables contradict each other, an argument or override is
            unknown, or the local rank exceeds the visible device count.
        BackendUnavailableError: the requested backend's device is not present.
        MPIUnavailableError: started by mpirun without MASTER_ADDR, and mpi4py or the MPI
            library is missing.
        RendezvousError: the ranks did not meet within ``rendezvous_timeout``; the message
            holds the address and port tried.
    """
    global _initialized
    environ = dict(os.environ)
    if dist.is_initialized():
        return _reuse(backend, device, environ)
    timeout_s = _seconds(timeout, what="timeout")
    rendezvous_s = _rendezvous_seconds(rendezvous_timeout, timeout_s, environ)
    dist_env = parse_env(environ, sys.argv[1:])
    requested = resolve_request(backend, device, environ)
    plan = choose_device(*requested, local_rank=dist_env.local_rank, accelerators=probe_accelerators(*requested))
    # HCCL binds its communicator to the current device: set it before init_process_group.
    torch_device = set_current_device(plan)
    dist_env = _resolve_master(dist_env)
    store = _create_store(dist_env, rendezvous_s, environ)
    pg_timeout = timedelta(seconds=timeout_s) if timeout_s is not None else None
    # Later store traffic (new_group, store-based barriers) follows the collective timeout.
    store.set_timeout(pg_timeout or default_pg_timeout)
    dist.init_process_group(
        plan.backend, store=store, rank=dist_env.rank, world_size=dist_env.world_size, timeout=pg_timeout,
        device_id=torch_device if plan.backend == "nccl" else None,
    )
    _export(dist_env)
    _initialized = _Initialized(dist_env, plan, torch_device, weakref.ref(dist.group.WORLD))
    return torch_device

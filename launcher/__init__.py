"""Launching and process-group setup for sharded_fused_adam: launcher discovery, device and backend choice.

Call :func:`init_distributed` once at the top of a training script; start the script with
torchrun, ``python -m launcher`` (``sharded-fused-adam-launch``), mpirun/mpiexec, SLURM srun,
the deepspeed launcher, or plain ``python``. See ``docs/launching.md``.
"""
from __future__ import annotations

from launcher.device import Accelerators, DevicePlan, choose_device, probe_accelerators, resolve_request
from launcher.env import DistEnv, parse_env
from launcher.errors import BackendUnavailableError, LaunchError, MPIUnavailableError, RendezvousError
from launcher.process_group import init_distributed

__all__ = [
    "Accelerators",
    "BackendUnavailableError",
    "DevicePlan",
    "DistEnv",
    "LaunchError",
    "MPIUnavailableError",
    "RendezvousError",
    "choose_device",
    "init_distributed",
    "parse_env",
    "probe_accelerators",
    "resolve_request",
]

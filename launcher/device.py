"""Backend and device choice (npu->hccl, cuda->nccl, cpu->gloo); the only launcher module importing torch_npu.

The choice itself (:func:`resolve_request`, :func:`choose_device`) is pure: what the machine
has is passed in as an :class:`Accelerators` value. :func:`probe_accelerators` fills that value
from the real machine, and :func:`set_current_device` makes the choice current.
"""
from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

from launcher.errors import BackendUnavailableError

if TYPE_CHECKING:
    import torch

__all__ = [
    "BACKENDS",
    "DEVICE_TYPES",
    "Accelerators",
    "DevicePlan",
    "choose_device",
    "probe_accelerators",
    "resolve_request",
    "set_current_device",
]

BACKENDS: tuple[str, ...] = ("auto", "hccl", "nccl", "gloo")
DEVICE_TYPES: tuple[str, ...] = ("auto", "npu", "cuda", "cpu")

_BACKEND_FOR_DEVICE = {"npu": "hccl", "cuda": "nccl", "cpu": "gloo"}
_DEVICE_FOR_BACKEND = {"hccl": "npu", "nccl": "cuda", "gloo": "cpu"}
# gloo also reduces CUDA tensors (slowly); every other pairing fails inside torch.
_VALID_PAIRS = {("hccl", "npu"), ("nccl", "cuda"), ("gloo", "cpu"), ("gloo", "cuda")}
_VISIBLE_DEVICES_VAR = {"npu": "ASCEND_RT_VISIBLE_DEVICES", "cuda": "CUDA_VISIBLE_DEVICES"}


@dataclass(frozen=True)
class Accelerators:
    """What this machine offers, as seen by this process.

    Attributes:
        npu_count: visible Ascend NPUs (0 when torch_npu is absent or was not probed).
        cuda_count: visible CUDA devices.
        npu_error: why torch_npu could not be used, when importing it was tried and failed.
    """

    npu_count: int = 0
    cuda_count: int = 0
    npu_error: str | None = None

    def __post_init__(self) -> None:
        for name in ("npu_count", "cuda_count"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def count(self, device_type: str) -> int:
        """Visible devices of ``device_type`` (``"npu"`` or ``"cuda"``)."""
        return self.npu_count if device_type == "npu" else self.cuda_count


@dataclass(frozen=True)
class DevicePlan:
    """The chosen process-group backend and this rank's device.

    Attributes:
        backend: ``"hccl"``, ``"nccl"`` or ``"gloo"``.
        device_type: ``"npu"``, ``"cuda"`` or ``"cpu"``.
        device_index: the accelerator index (the local rank), None for the CPU.
    """

    backend: str
    device_type: str
    device_index: int | None

    @property
    def device(self) -> str:
        """The device string, e.g. ``"npu:3"`` or ``"cpu"``."""
        return self.device_type if self.device_index is None else f"{self.device_type}:{self.device_index}"


def _check_name(value: str, allowed: tuple[str, ...], *, what: str) -> str:
    name = value.strip().lower()
    if name not in allowed:
        raise ValueError(f"{what} must be one of {allowed}, got {value!r}")
    return name


def _merge(argument: str, environ: Mapping[str, str], var: str, allowed: tuple[str, ...], what: str) -> str:
    explicit = _check_name(argument, allowed, what=what)
    from_env = _check_name(environ[var], allowed, what=var) if environ.get(var) else "auto"
    if explicit == "auto":
        return from_env
    if from_env not in ("auto", explicit):
        warnings.warn(f"{var}={from_env!r} is ignored because the script passes {what}={explicit!r}",
                      stacklevel=3)
    return explicit


def resolve_request(backend: str, device: str, environ: Mapping[str, str]) -> tuple[str, str]:
    """Merge the caller's backend/device with the ``SFA_BACKEND`` / ``SFA_DEVICE`` overrides.

    An argument other than ``"auto"`` wins over the variable (with a warning when they
    differ); the variable replaces ``"auto"``.

    Args:
        backend: ``"auto"``, ``"hccl"``, ``"nccl"`` or ``"gloo"`` (case-insensitive).
        device: ``"auto"``, ``"npu"``, ``"cuda"`` or ``"cpu"`` (case-insensitive).
        environ: the environment mapping holding the overrides.

    Returns:
        The requested ``(backend, device_type)``, each possibly still ``"auto"``.

    Raises:
        ValueError: an argument or variable names an unknown backend or device.
    """
    return (
        _merge(backend, environ, "SFA_BACKEND", BACKENDS, "backend"),
        _merge(device, environ, "SFA_DEVICE", DEVICE_TYPES, "device"),
    )


def _unavailable(backend: str, device_type: str, accelerators: Accelerators) -> BackendUnavailableError:
    if device_type == "npu":
        reason = accelerators.npu_error or "torch_npu is importable but torch.npu.device_count() is 0"
        what = "Ascend NPU"
    else:
        reason = "torch.cuda.is_available() is False"
        what = "CUDA device"
    return BackendUnavailableError(
        f"backend {backend!r} on device {device_type!r} was requested but this machine has no {what} "
        f"({reason}); request backend='gloo' (or set SFA_BACKEND=gloo) to run on the CPU"
    )


def choose_device(backend: str, device: str, *, local_rank: int, accelerators: Accelerators) -> DevicePlan:
    """Pick the backend and this rank's device.

    With both ``"auto"``: an NPU gives hccl, else CUDA gives nccl, else gloo on the CPU. A
    given backend implies its device (hccl->npu, nccl->cuda, gloo->cpu) and a given device
    implies its backend; gloo may also be paired with ``"cuda"`` explicitly. An accelerator
    rank uses the device numbered by its local rank.

    Args:
        backend: requested backend, ``"auto"`` to choose.
        device: requested device type, ``"auto"`` to choose.
        local_rank: this rank's index on its node.
        accelerators: what the machine has (see :func:`probe_accelerators`).

    Returns:
        The plan.

    Raises:
        ValueError: an unknown name, a backend that cannot drive the device, or a local rank
            beyond the visible device count.
        BackendUnavailableError: the requested accelerator is not present.
    """
    backend = _check_name(backend, BACKENDS, what="backend")
    device = _check_name(device, DEVICE_TYPES, what="device")
    if device == "auto" and backend != "auto":
        device = _DEVICE_FOR_BACKEND[backend]
    elif device == "auto":
        device = "npu" if accelerators.npu_count else "cuda" if accelerators.cuda_count else "cpu"
    if backend == "auto":
        backend = _BACKEND_FOR_DEVICE[device]
    if (backend, device) not in _VALID_PAIRS:
        raise ValueError(f"backend {backend!r} cannot drive device {device!r}; "
                         f"valid pairs are {sorted(_VALID_PAIRS)}")
    if device == "cpu":
        return DevicePlan(backend, device, None)
    count = accelerators.count(device)
    if count == 0:
        raise _unavailable(backend, device, accelerators)
    if local_rank >= count:
        raise ValueError(
            f"local rank {local_rank} needs {device}:{local_rank} but only {count} {device} device(s) are "
            f"visible: start at most {count} ranks per node or check {_VISIBLE_DEVICES_VAR[device]}"
        )
    return DevicePlan(backend, device, local_rank)


def _import_torch_npu() -> None:
    """Import torch_npu (which registers ``torch.npu``); the launcher's only import of it."""
    import torch_npu  # noqa: F401  (imported for its side effect)


def _probe_npus(required: bool) -> tuple[int, str | None]:
    """Count NPUs. Importing torch_npu without the CANN toolkit raises ImportError or OSError."""
    if not required and importlib.util.find_spec("torch_npu") is None:
        return 0, None
    try:
        _import_torch_npu()
    except (ImportError, OSError) as err:
        reason = f"importing torch_npu failed: {type(err).__name__}: {err}"
        if not required:
            warnings.warn(f"torch_npu is installed but unusable ({reason}); not using NPUs", stacklevel=3)
        return 0, reason
    import torch

    return (torch.npu.device_count() if torch.npu.is_available() else 0), None


def probe_accelerators(backend: str, device: str) -> Accelerators:
    """Look at the real machine for what :func:`choose_device` needs.

    torch_npu is imported only when an NPU is requested (hccl / npu) or when the request is
    fully automatic and torch_npu is installed; an explicit CUDA or CPU request never imports it.

    Args:
        backend: the requested backend (after :func:`resolve_request`).
        device: the requested device type (after :func:`resolve_request`).

    Returns:
        The visible NPU and CUDA device counts.
    """
    import torch

    npu_wanted = backend == "hccl" or device == "npu"
    npu_possible = npu_wanted or (backend == "auto" and device == "auto")
    npu_count, npu_error = _probe_npus(required=npu_wanted) if npu_possible else (0, None)
    cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return Accelerators(npu_count=npu_count, cuda_count=cuda_count, npu_error=npu_error)


def set_current_device(plan: DevicePlan) -> torch.device:
    """Make ``plan``'s device current for this process (HCCL needs this before the process group).

    Args:
        plan: the chosen plan.

    Returns:
        The ``torch.device`` of this rank.
    """
    import torch

    if plan.device_type == "npu":
        torch.npu.set_device(plan.device_index)
    elif plan.device_type == "cuda":
        torch.cuda.set_device(plan.device_index)
    return torch.device(plan.device)

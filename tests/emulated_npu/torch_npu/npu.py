"""``torch.npu`` for the emulated NPU: the device-module functions this project and torch call."""
from __future__ import annotations

from typing import Any, Optional, Union

import torch

from . import _extension

__all__ = ["is_available", "device_count", "set_device", "current_device", "synchronize", "memory_allocated",
           "max_memory_allocated", "reset_peak_memory_stats", "reset_max_memory_allocated", "get_device_name",
           "manual_seed", "manual_seed_all", "is_initialized"]

DeviceLike = Union[int, str, torch.device, None]


def _index(device: DeviceLike) -> int:
    if device is None:
        return current_device()
    if isinstance(device, int):
        return device
    device = torch.device(device)
    return device.index if device.index is not None else current_device()


def is_available() -> bool:
    return True


def is_initialized() -> bool:
    return True


def _is_in_bad_fork() -> bool:
    return False


def device_count() -> int:
    return _extension.load().device_count()


def set_device(device: DeviceLike) -> None:
    _extension.load().set_device(_index(device))


def current_device() -> int:
    return _extension.load().current_device()


def synchronize(device: DeviceLike = None) -> None:
    """Nothing to wait for: every emulated kernel has finished when its call returns."""


def memory_allocated(device: DeviceLike = None) -> int:
    return _extension.load().memory_stats(_index(device))["allocated_bytes"]


def max_memory_allocated(device: DeviceLike = None) -> int:
    return _extension.load().memory_stats(_index(device))["peak_bytes"]


def reset_peak_memory_stats(device: DeviceLike = None) -> None:
    _extension.load().reset_peak(_index(device))


reset_max_memory_allocated = reset_peak_memory_stats


def memory_stats(device: DeviceLike = None) -> dict[str, Any]:
    stats = _extension.load().memory_stats(_index(device))
    return {"allocated_bytes.all.current": stats["allocated_bytes"], "allocated_bytes.all.peak": stats["peak_bytes"]}


def get_device_name(device: DeviceLike = None) -> str:
    return "Emulated Ascend NPU (host memory, CPU kernels)"


def manual_seed(seed: int) -> None:
    """Random ops run on the CPU kernels with the CPU generator, seeded by ``torch.manual_seed``."""


manual_seed_all = manual_seed


def get_amp_supported_dtype() -> list[torch.dtype]:
    return [torch.float16, torch.bfloat16]


def current_stream(device: Optional[DeviceLike] = None) -> None:
    return None

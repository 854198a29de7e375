"""Adam kernel registry: interchangeable implementations behind one signature, chosen once per device.

Every kernel module exposes ``adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
steps, *, lr, beta1, beta2, eps, weight_decay, amsgrad, decoupled, maximize)`` working in place
on contiguous 1-D fp32/fp64 tensors (steps already incremented; ``maximize`` ascends the
gradient as torch.optim.Adam's does; the grads are never written), and
``unavailable_reason(device) -> str | None``. A kernel also declares which stored state it
updates in place (``reads_in_place(compute_dtype, stored_dtype) -> bool``; default: state
stored in the compute dtype only): the storage stages everything else through compute-dtype
scratch (see [Note: state storage] in core/storage.py), so the kernel, not the storage,
decides what it reads natively. Every kernel here reads only its compute dtype.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import npu, reference, torch_fused

__all__ = ["AdamKernel", "KERNEL_NAMES", "same_dtype", "select_kernel"]


def same_dtype(compute_dtype: torch.dtype, stored_dtype: torch.dtype) -> bool:
    """The default ``reads_in_place``: state stored in the compute dtype only."""
    return compute_dtype == stored_dtype


@dataclass(frozen=True)
class AdamKernel:
    """A named Adam implementation (see the module docstring for the contract)."""

    name: str
    adam_step: Callable[..., None]
    unavailable_reason: Callable[[torch.device], Optional[str]]
    reads_in_place: Callable[[torch.dtype, torch.dtype], bool] = same_dtype


_KERNELS = {
    m.__name__.rsplit(".", 1)[-1]: AdamKernel(m.__name__.rsplit(".", 1)[-1], m.adam_step, m.unavailable_reason,
                                              getattr(m, "reads_in_place", same_dtype))
    for m in (reference, torch_fused, npu)
}
KERNEL_NAMES = tuple(_KERNELS)
_DEFAULT = "torch_fused"


def select_kernel(name: str | None, device: torch.device) -> AdamKernel:
    """The kernel to use on ``device``: ``name`` if given, else the default (``torch_fused``).

    An unavailable kernel falls back, with one warning naming both, to the default or, if
    that is unavailable too, to ``reference``.

    Raises:
        ValueError: ``name`` is not a known kernel.
    """
    if name is not None and name not in _KERNELS:
        raise ValueError(f"kernel must be one of {KERNEL_NAMES} or None, got {name!r}")
    wanted = _KERNELS[name or _DEFAULT]
    reason = wanted.unavailable_reason(device)
    if reason is None:
        return wanted
    fallback = _KERNELS[_DEFAULT]
    if fallback is wanted or fallback.unavailable_reason(device) is not None:
        fallback = _KERNELS["reference"]
    warnings.warn(f"Adam kernel {wanted.name!r} is unavailable on {device}: {reason}; "
                  f"falling back to {fallback.name!r}", RuntimeWarning, stacklevel=3)
    return fallback

"""A stand-in for ``torch_npu`` on a machine without an Ascend NPU (tests only).

Importing it does what importing torch_npu does, on an emulated device (see
``csrc/emulated_npu.cpp``): the PrivateUse1 backend is renamed ``npu``, ``torch.npu`` is the
device module, tensors get ``.npu()`` / ``is_npu``, and ``init_process_group("hccl")`` works
(through gloo, with HCCL's rules: ``_hccl.py``). ``npu_apply_adam_w`` follows the CANN
formula. What exists only here (the emulator's counters) lives in ``torch_npu.emulated``.
"""
from __future__ import annotations

import types
from typing import Optional, Sequence

import torch

from . import _extension, _hccl, npu

__version__ = "0.0+emulated"
EMULATED = True

_lib = _extension.load()
if torch._C._get_privateuse1_backend_name() != "npu":
    torch.utils.rename_privateuse1_backend("npu")
    torch._register_device_module("npu", npu)
    torch.utils.generate_methods_for_privateuse1_backend(for_storage=True)
_hccl.register(_lib.host_alias)


def _fallback_counts() -> dict[str, int]:
    """Calls per op that took torch_npu's CPU fallback (ops torch_npu has no NPU kernel for)."""
    return dict(_lib.npu_fallback_counts())


def _sync_counts() -> dict[str, int]:
    """Host synchronisations: ``local_scalar_dense`` (``.item()``) and device-to-host copies."""
    return dict(_lib.sync_counts())


emulated = types.SimpleNamespace(
    fallback_counts=_fallback_counts,
    sync_counts=_sync_counts,
    op_counts=lambda: dict(_lib.emulated_op_counts()),
    reset_counts=_lib.reset_counts,
)


def npu_apply_adam_w(beta1_power: float, beta2_power: float, lr: float, weight_decay: float, beta1: float,
                     beta2: float, eps: float, grad: torch.Tensor, max_grad_norm: Optional[torch.Tensor],
                     amsgrad: bool, maximize: bool, *, out: Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
    """ApplyAdamW as CANN documents it: the powers are multiplied by the betas inside the
    kernel, decay is decoupled, ``max_grad_norm`` is the AMSGrad maximum (read, not written)."""
    var, m, v = out
    g = -grad if maximize else grad
    m.mul_(beta1).add_(g, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    if weight_decay:
        var.mul_(1 - lr * weight_decay)
    second = torch.maximum(max_grad_norm, v) if amsgrad else v
    denom = (second / (1 - beta2_power * beta2)).sqrt_().add_(eps)
    var.addcdiv_(m, denom, value=-lr / (1 - beta1_power * beta1))
    return out

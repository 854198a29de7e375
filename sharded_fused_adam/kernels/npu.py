"""Ascend's ApplyAdamW kernel (``torch_npu.npu_apply_adam_w``); torch_npu is imported lazily.

[Note: ApplyAdamW arguments]
The CANN kernel takes the bias-correction powers as inputs and multiplies them by the betas
itself before use (``beta1_power_out = beta1_power * beta1``), so for step ``t`` we pass
``beta**(t - 1)`` (op-plugin's test, the CANN formula, MindSpeed and DeepSpeed PR #5777
agree). Its weight decay is decoupled (``var *= 1 - lr * weight_decay``); classic Adam's L2
term is folded into the gradient here and the kernel gets ``weight_decay=0``. Its
``max_grad_norm`` input is the AMSGrad running maximum; we refresh that buffer ourselves
after the call so the result does not depend on whether the kernel writes it back. Its
``maximize`` input negates the gradient first (``g = -grad``), so with maximize the folded
L2 term enters with a minus sign: the kernel then sees ``-(grad - wd * p) = -grad + wd * p``,
torch's order (negate, then add the decay).
``apply_adam_w_args`` is the pure translation, tested against the CANN formula on CPU.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

__all__ = ["ApplyAdamWArgs", "apply_adam_w_args", "adam_step", "unavailable_reason"]


class ApplyAdamWArgs(NamedTuple):
    """Scalars for one ``npu_apply_adam_w`` call, plus the L2 coefficient to fold into the grad."""

    beta1_power: float
    beta2_power: float
    lr: float
    weight_decay: float
    beta1: float
    beta2: float
    eps: float
    l2_weight_decay: float
    maximize: bool


def apply_adam_w_args(
    *, step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float, decoupled: bool,
    maximize: bool,
) -> ApplyAdamWArgs:
    """Translate our hyperparameters at (already incremented) ``step`` into the kernel's arguments."""
    assert step >= 1, step
    return ApplyAdamWArgs(
        beta1_power=beta1 ** (step - 1),
        beta2_power=beta2 ** (step - 1),
        lr=lr,
        weight_decay=weight_decay if decoupled else 0.0,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        l2_weight_decay=0.0 if decoupled else (-weight_decay if maximize else weight_decay),
        maximize=maximize,
    )


def _torch_npu():
    import torch_npu  # noqa: F401  (optional dependency, only present on Ascend machines)

    return torch_npu


def unavailable_reason(device: torch.device) -> str | None:
    """``None`` on an NPU device with torch_npu importable, else why not."""
    if device.type != "npu":
        return f"it runs only on NPU devices, not {device.type}"
    try:
        torch_npu = _torch_npu()
    except (ImportError, OSError, RuntimeError) as exc:
        return f"torch_npu cannot be imported ({exc})"
    if not hasattr(torch_npu, "npu_apply_adam_w"):
        return f"torch_npu {getattr(torch_npu, '__version__', '?')} has no npu_apply_adam_w"
    return None


def adam_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    max_exp_avg_sqs: Sequence[torch.Tensor],
    steps: Sequence[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    decoupled: bool,
    maximize: bool,
) -> None:
    """Update ``params`` and moments in place; ``steps`` are already incremented."""
    torch_npu = _torch_npu()
    for i, (param, grad, exp_avg, exp_avg_sq) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        a = apply_adam_w_args(step=steps[i], lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                              weight_decay=weight_decay, decoupled=decoupled, maximize=maximize)
        if a.l2_weight_decay:
            grad = grad.add(param, alpha=a.l2_weight_decay)
        max_buf = max_exp_avg_sqs[i] if amsgrad else None
        torch_npu.npu_apply_adam_w(a.beta1_power, a.beta2_power, a.lr, a.weight_decay, a.beta1,
                                   a.beta2, a.eps, grad, max_buf, amsgrad, a.maximize,
                                   out=(param, exp_avg, exp_avg_sq))
        if max_buf is not None:
            torch.maximum(max_buf, exp_avg_sq, out=max_buf)

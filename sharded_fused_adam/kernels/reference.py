"""Reference Adam/AdamW in plain torch ops: the test oracle and the fallback on any device.

The arithmetic follows ``torch.optim.Adam``'s single-tensor implementation operation by
operation (Python-float bias corrections, ``lerp_`` for the first moment), so on the same
inputs it matches ``torch.optim.Adam(foreach=False)`` bit for bit.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["adam_step", "unavailable_reason"]


def unavailable_reason(device: torch.device) -> str | None:
    """Plain torch ops run wherever tensors do."""
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
    for i, (param, grad, exp_avg, exp_avg_sq) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        step = steps[i]
        if maximize:
            grad = -grad
        if weight_decay != 0:
            if decoupled:
                param.mul_(1 - lr * weight_decay)
            else:
                grad = grad.add(param, alpha=weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = lr / (1 - beta1**step)
        bias_correction2_sqrt = math.sqrt(1 - beta2**step)
        if amsgrad:
            torch.maximum(max_exp_avg_sqs[i], exp_avg_sq, out=max_exp_avg_sqs[i])
            second = max_exp_avg_sqs[i]
        else:
            second = exp_avg_sq
        denom = (second.sqrt() / bias_correction2_sqrt).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)

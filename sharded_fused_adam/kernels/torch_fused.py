"""torch's own fused Adam/AdamW ops (``torch._fused_adam_`` / ``torch._fused_adamw_``).

One call updates a list of tensors in a single pass per element (28 bytes/element for
fp32). We never pass ``grad_scale``/``found_inf``: the torch_npu release we read (its
``_fused_adamw_`` op-plugin binding) ignores them on NPU, so unscaling and overflow skipping
happen in the optimizer for every device (docs/devices.md).

[Note: classic Adam on the NPU]
torch_npu registers an NPU kernel for ``torch._fused_adamw_`` only (op-plugin, through
``aclnnApplyAdamWV2``); ``torch._fused_adam_`` has none, so on an NPU it runs on the CPU
through torch_npu's fallback (one "CAUTION ... fall back to run on the CPU" warning, a copy of
every tensor each way per call) or raises under ``TORCH_NPU_FALLBACK_CPU_DISABLE=1``. So on
device types listed in ``_ADAMW_ONLY``, classic Adam (L2 decay) folds ``weight_decay * p``
into a temporary copy of the gradient (``-weight_decay`` with ``maximize``: the op negates
the gradient first, so it sees ``-grad + wd * p``, torch's order) and calls
``_fused_adamw_`` with ``weight_decay=0``. That is torch.optim.Adam's math with one rounding
moved (the decay is added by a separate op instead of inside the kernel); elsewhere the
classic op runs and the CPU path stays bitwise torch.optim.Adam(fused=True). The probe runs
the op each device actually uses.
"""
from __future__ import annotations

import warnings
from functools import lru_cache
from typing import Sequence

import torch

__all__ = ["adam_step", "ops_used", "unavailable_reason"]

_ADAMW_ONLY = ("npu",)  # device types whose only fused Adam kernel is _fused_adamw_ (see the Note)
_FALLBACK_WARNING = "fall back to run on the CPU"


def ops_used(device_type: str) -> tuple[str, ...]:
    """The torch ops this kernel calls on ``device_type`` (classic Adam, AdamW)."""
    return ("_fused_adamw_",) if device_type in _ADAMW_ONLY else ("_fused_adam_", "_fused_adamw_")


def _probe_op(name: str, device: torch.device) -> str | None:
    if not hasattr(torch, name):
        return f"torch {torch.__version__} has no torch.{name}"
    t = [torch.zeros(16, device=device)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            getattr(torch, name)(t, [torch.ones(16, device=device)], [torch.zeros(16, device=device)],
                                 [torch.zeros(16, device=device)], [], [torch.ones((), device=device)], lr=0.1,
                                 beta1=0.9, beta2=0.99, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)
        except (RuntimeError, NotImplementedError) as exc:
            return f"torch.{name} failed on {device}: {str(exc).splitlines()[0]}"
    fallback = [str(w.message) for w in caught if _FALLBACK_WARNING in str(w.message)]
    if fallback:
        return f"torch.{name} has no kernel on {device} (it ran on the CPU: {fallback[0]})"
    return None


@lru_cache(maxsize=None)
def _probe(device_type: str, device_index: int | None) -> str | None:
    device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    for name in ops_used(device_type):
        reason = _probe_op(name, device)
        if reason is not None:
            return reason
    return None


@lru_cache(maxsize=256)
def _step_tensor(step: int, device: torch.device) -> torch.Tensor:
    """A 0-d fp32 tensor holding ``step``, shared by every call (the op only reads it): a staged
    update calls the kernel once per chunk, and a new tensor per call costs as much as a small chunk."""
    return torch.full((), float(step), dtype=torch.float32, device=device)


def unavailable_reason(device: torch.device) -> str | None:
    """Run the op(s) used on ``device`` once (cached): ``None`` if they work natively, else why not."""
    return _probe(device.type, device.index)


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
    device = params[0].device
    state_steps = [_step_tensor(s, device) for s in steps]
    grads = list(grads)
    if decoupled or device.type not in _ADAMW_ONLY:
        op = torch._fused_adamw_ if decoupled else torch._fused_adam_
    else:  # see [Note: classic Adam on the NPU]
        op = torch._fused_adamw_
        if weight_decay != 0:
            l2 = -weight_decay if maximize else weight_decay
            grads = [g.add(p, alpha=l2) for g, p in zip(grads, params)]
            weight_decay = 0.0
    op(list(params), grads, list(exp_avgs), list(exp_avg_sqs),
       list(max_exp_avg_sqs) if amsgrad else [], state_steps,
       lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps,
       amsgrad=amsgrad, maximize=maximize)

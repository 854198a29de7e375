"""torch's own fused Adam/AdamW ops (``torch._fused_adam_`` / ``torch._fused_adamw_``).

One call updates a list of tensors in a single pass per element (28 bytes/element for
fp32). The same ops run on CPU (torch >= 2.4), CUDA and, through torch_npu, on Ascend NPUs
(``aclnnApplyAdamWV2``). We never pass ``grad_scale``/``found_inf``: the torch_npu release we
read (its ``_fused_adamw_`` op-plugin binding) ignores them on NPU, so unscaling and overflow
skipping happen in the optimizer for every device (docs/devices.md).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import torch

__all__ = ["adam_step", "unavailable_reason"]


@lru_cache(maxsize=None)
def _probe(device_type: str, device_index: int | None) -> str | None:
    if not hasattr(torch, "_fused_adam_"):
        return f"torch {torch.__version__} has no torch._fused_adam_"
    device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    try:
        t = [torch.zeros(16, device=device)]
        torch._fused_adam_(t, [torch.ones(16, device=device)], [torch.zeros(16, device=device)],
                           [torch.zeros(16, device=device)], [],
                           [torch.ones((), device=device)], lr=0.1, beta1=0.9, beta2=0.99,
                           weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)
    except (RuntimeError, NotImplementedError) as exc:
        return f"torch._fused_adam_ failed on {device}: {str(exc).splitlines()[0]}"
    return None


@lru_cache(maxsize=256)
def _step_tensor(step: int, device: torch.device) -> torch.Tensor:
    """A 0-d fp32 tensor holding ``step``, shared by every call (the op only reads it): a staged
    update calls the kernel once per chunk, and a new tensor per call costs as much as a small chunk."""
    return torch.full((), float(step), dtype=torch.float32, device=device)


def unavailable_reason(device: torch.device) -> str | None:
    """Run the op once on ``device`` (cached): ``None`` if it works, else why not."""
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
    op = torch._fused_adamw_ if decoupled else torch._fused_adam_
    op(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs),
       list(max_exp_avg_sqs) if amsgrad else [], state_steps,
       lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps,
       amsgrad=amsgrad, maximize=maximize)

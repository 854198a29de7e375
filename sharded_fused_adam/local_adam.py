"""``FusedAdam``: a local (single-process, no communication) Adam/AdamW on the kernel registry.

It keeps torch's layout exactly: per-param state ``self.state[p]`` with ``step`` (a 0-d
fp32 tensor), ``exp_avg``, ``exp_avg_sq`` (and ``max_exp_avg_sq`` with amsgrad), in the
param's dtype, created lazily at the first step that sees a gradient. So it is what
DeepSpeed's ZeRO stage 1/2 needs from a wrapped optimizer (see [Note: delegated mode]),
and on one device it replaces ``NpuFusedAdam`` without packing params into flat buffers.

[Note: delegated mode]
At ZeRO stage 1/2 DeepSpeed builds the optimizer on the model's params, then replaces each
``param_groups[i]["params"]`` with one flat fp32 partition of its own, sets that
partition's ``.grad`` to this rank's reduced gradient, and during its ``step()`` sets
``param_groups`` to a single group at a time. Anything that packs, hooks or caches params
at construction (``ShardedFusedAdam`` does all three) breaks under that; this class looks at
``param_groups`` only inside ``step()``, like torch.optim.Adam.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, NamedTuple, Optional

import torch

from .kernels import KERNEL_NAMES, AdamKernel, select_kernel
from .kernels.rule import ADAM, adam_defaults, check_hyperparameters

__all__ = ["FusedAdam"]


class _Batch(NamedTuple):
    """The tensors of one param group on one device and dtype: one kernel call."""

    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    exp_avgs: list[torch.Tensor]
    exp_avg_sqs: list[torch.Tensor]
    max_exp_avg_sqs: list[torch.Tensor]
    steps: list[int]
    write_back: list[tuple[torch.Tensor, torch.Tensor]]  # (param, contiguous copy updated instead)


class FusedAdam(torch.optim.Optimizer):
    """Adam/AdamW with ``torch.optim.Adam``'s semantics and state layout, one kernel call per
    param group, device and dtype.

    Args:
        params: params or param groups (dicts), as for any torch optimizer.
        lr: learning rate (>= 0).
        betas: coefficients of the running averages, each in [0, 1).
        eps: term added to the denominator (>= 0).
        weight_decay: L2 penalty (decoupled if ``adamw``), >= 0.
        amsgrad: use the AMSGrad variant.
        adamw: decoupled weight decay (``torch.optim.AdamW``); per group as
            ``decoupled_weight_decay``, the key torch.optim.Adam uses too.
        kernel: ``"torch_fused"`` (default), ``"npu"`` or ``"reference"`` (see
            ``sharded_fused_adam.kernels``); chosen once per device.
        maximize: ascend the gradient instead of descending, as torch.optim.Adam's.
        decoupled_weight_decay: torch.optim.Adam's name for ``adamw`` (either turns it on).
        foreach: as for ``ShardedFusedAdam``: always fused, so ``True`` warns.
        fused: as for ``ShardedFusedAdam``: ``False`` warns.
        capturable: ``True`` raises NotImplementedError.
        differentiable: ``True`` raises NotImplementedError.

    Raises:
        ValueError: a hyperparameter out of range, an unknown kernel or empty params.
        TypeError: a hyperparameter of the wrong type.
        NotImplementedError: ``capturable=True`` or ``differentiable=True``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        adamw: bool = False,
        kernel: Optional[str] = None,
        maximize: bool = False,
        decoupled_weight_decay: bool = False,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        capturable: bool = False,
        differentiable: bool = False,
    ):
        defaults = adam_defaults(lr, betas, eps, weight_decay, amsgrad, adamw, maximize=maximize,
                                 decoupled_weight_decay=decoupled_weight_decay, foreach=foreach, fused=fused,
                                 capturable=capturable, differentiable=differentiable)
        if kernel is not None and kernel not in KERNEL_NAMES:
            raise ValueError(f"kernel must be one of {KERNEL_NAMES} or None, got {kernel!r}")
        self._kernel_name = kernel
        self._kernels: dict[torch.device, AdamKernel] = {}
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # load_state_dict lands here: a dict saved before ``maximize`` existed (ours, or an
        # old torch one) gets torch's default, as torch.optim.Adam.__setstate__ gives it.
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (torch semantics); its hyperparameters are validated."""
        super().add_param_group(param_group)
        try:
            check_hyperparameters(self.param_groups[-1], f"param group {len(self.param_groups) - 1}")
        except (TypeError, ValueError, RuntimeError):
            self.param_groups.pop()
            raise

    def _kernel(self, device: torch.device) -> AdamKernel:
        if device not in self._kernels:
            self._kernels[device] = select_kernel(self._kernel_name, device)
        return self._kernels[device]

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Update every param that has a gradient; params without one keep their state.

        Args:
            closure: re-evaluates the model and returns the loss (optional).

        Returns:
            The closure's loss, if any.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            scalars = ADAM.kernel_scalars(group)
            for (device, _), batch in self._collect(group).items():
                self._kernel(device).adam_step(
                    batch.params, batch.grads, batch.exp_avgs, batch.exp_avg_sqs, batch.max_exp_avg_sqs,
                    batch.steps, **scalars)
                for param, updated in batch.write_back:
                    param.copy_(updated)
        return loss

    def _collect(self, group: dict[str, Any]) -> dict[tuple[torch.device, torch.dtype], _Batch]:
        """Advance the step of every param of ``group`` with a gradient and batch its tensors."""
        batches: dict[tuple[torch.device, torch.dtype], _Batch] = {}
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError("FusedAdam does not support sparse gradients (e.g. use "
                                   "nn.Embedding(sparse=False) or torch.optim.SparseAdam)")
            state = self._state_for(p, group)
            state["step"] += 1
            batch = batches.get((p.device, p.dtype))
            if batch is None:
                batch = batches[(p.device, p.dtype)] = _Batch([], [], [], [], [], [], [])
            # Kernels take contiguous tensors; a strided param (rare: e.g. a transposed
            # view made a Parameter) is updated in a contiguous copy and copied back.
            target = p if p.is_contiguous() else p.contiguous()
            if target is not p:
                batch.write_back.append((p, target))
            batch.params.append(target.view(-1))
            batch.grads.append(grad.contiguous().view(-1))
            # the rule's keys come in the order of the kernel's state arguments (kernels/rule.py)
            for key, tensors in zip(ADAM.keys_for(group), (batch.exp_avgs, batch.exp_avg_sqs, batch.max_exp_avg_sqs)):
                tensors.append(state[key].view(-1))
            batch.steps.append(int(state["step"].item()))
        return batches

    def _state_for(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
        for key in ADAM.keys_for(group):  # created lazily, as torch.optim.Adam does
            if key not in state:
                state[key] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        return state

"""``ShardedFusedAdam``: the glue that turns buckets, a reducer, a kernel and a comm plan into Adam.

A step reads as its three phases (see ``step``): the averaged gradients reach each rank's
shards (reduce), each rank runs the fused kernel on its shards (update), and every rank
receives the updated shards straight into the model's params (gather).
"""
from __future__ import annotations

import contextlib
import warnings
from datetime import timedelta
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import torch
import torch.distributed as dist

from .bucket import Bucket
from .checkpoint import apply_state_dict, gather_state_dict
from .comm import CommCounter, choose_comm_plan
from .flat_buffer import check_unmoved
from .kernels import select_kernel
from .layout import plan_buckets
from .memory import MemoryReport, memory_report
from .param_gather import ParamGather
from .precision import (GradStats, LossScaler, clip_coefficient, local_stats, make_loss_scaler,
                        read_stats)
from .reducer import GradReducer
from .shard_state import ShardState
from .validation import adam_defaults, check_hyperparameters, check_params

__all__ = ["ShardedFusedAdam", "ShardedFusedAdamW"]


class ShardedFusedAdam(torch.optim.Optimizer):
    """ZeRO-style sharded fused Adam; a drop-in for ``NpuFusedAdam`` and ``torch.optim.Adam``.

    Params are packed into flat buckets (one per param group and dtype, at most
    ``bucket_cap_mb`` each) and become views into them. Each rank owns one equal shard of
    every bucket: gradients are averaged into that shard during backward, the fused kernel
    updates only that shard (with fp32 masters for fp16/bf16 params), and the shards are
    gathered back into the params. After backward the gradients live in the optimizer,
    not in ``param.grad``: clip with ``clip_grad_norm_`` or ``max_grad_norm``.

    Args:
        params: params or param groups (dicts), as for any torch optimizer; ``(name, param)``
            pairs name params in error messages.
        lr: learning rate (>= 0).
        betas: coefficients of the running averages, each in [0, 1).
        eps: term added to the denominator (>= 0).
        weight_decay: L2 penalty (decoupled if ``adamw``), >= 0.
        amsgrad: use the AMSGrad variant.
        adamw: decoupled weight decay (``torch.optim.AdamW``); per group as
            ``decoupled_weight_decay``.
        process_group: the data-parallel group; default: the world group if
            torch.distributed is initialized, else a single rank.
        kernel: ``"torch_fused"`` (default), ``"npu"`` or ``"reference"``.
        bucket_cap_mb: soft size limit of one bucket of params, in MiB.
        overlap: start each bucket's reduction during backward as soon as it is complete.
        reduce_dtype: dtype in which fp16/bf16 gradients are summed across ranks (fp32 by
            default: a bf16 sum loses bits at every hop; pass the param dtype to halve traffic).
        comm: ``"auto"``, ``"scatter_gather"``, ``"allreduce_broadcast"`` or ``"send_recv"``
            (see comm.py).
        max_grad_norm: clip the global 2-norm of the averaged gradients inside ``step()``.
        loss_scale: ``None``, a static scale, ``"dynamic"`` or a ``LossScaler``; applied by
            ``backward(loss)`` and removed inside ``step()``.
        reduce_gradients: False if the model is wrapped in DDP, which averages the gradients
            itself: each rank then only keeps its shard of them (no second reduction).
        collective_timeout: seconds any of this optimizer's collectives may wait before a
            ``CollectiveError`` names the ranks that never joined (None: the process group's
            timeout, 30 min by default for gloo).
        overlap_param_gather: ``step()`` returns with the param gathers in flight; the first
            read of each bucket's params waits for that bucket (see param_gather.py), so a
            failed gather raises its ``CollectiveError`` there. Reads from other threads must
            call ``wait_for_gathers()`` first. False waits for every gather inside ``step()``.

    Raises:
        ValueError: a hyperparameter out of range, empty params, a duplicated, aliased,
            non-leaf or empty param, or params on several devices.
        TypeError: a non-tensor param, an unsupported dtype or a hyperparameter of the wrong type.
    """

    _step_supports_amp_scaling = True  # torch.amp.GradScaler hands itself to step()

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
        process_group: Optional[dist.ProcessGroup] = None,
        kernel: Optional[str] = None,
        bucket_cap_mb: float = 25.0,
        overlap: bool = True,
        reduce_dtype: torch.dtype = torch.float32,
        comm: str = "auto",
        max_grad_norm: Optional[float] = None,
        loss_scale: Union[None, float, str, LossScaler] = None,
        collective_timeout: Optional[float] = None,
        reduce_gradients: bool = True,
        overlap_param_gather: bool = False,
    ):
        if isinstance(params, torch.Tensor):
            raise TypeError("params must be an iterable of Tensors or dicts (e.g. model.parameters()), "
                            f"got a single Tensor of shape {tuple(params.shape)}")
        params = list(params)
        if not params:
            raise ValueError("params is empty: ShardedFusedAdam needs at least one parameter")
        defaults = adam_defaults(lr, betas, eps, weight_decay, amsgrad, adamw)
        if not bucket_cap_mb > 0:
            raise ValueError(f"bucket_cap_mb must be > 0, got {bucket_cap_mb}")
        if collective_timeout is not None and not collective_timeout > 0:
            raise ValueError(f"collective_timeout must be > 0 seconds or None, got {collective_timeout}")
        if reduce_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"reduce_dtype must be torch.float32, bfloat16 or float16, got {reduce_dtype}")
        self._bucket_cap_bytes = int(bucket_cap_mb * 2**20)
        self._taken: dict = {}
        self._buckets: list[Bucket] = []
        self._reducer: Optional[GradReducer] = None
        self._param_gather: Optional[ParamGather] = None
        super().__init__(params, defaults)
        if not self._taken:
            raise ValueError("params is empty: every param group has an empty 'params' list")
        self.device = self._taken["device"][0]
        self.comm_counter = CommCounter()
        timeout = timedelta(seconds=collective_timeout) if collective_timeout is not None else None
        self._plan = choose_comm_plan(process_group, self.device, comm, self.comm_counter, timeout)
        self.rank, self.world_size = self._plan.rank, self._plan.world_size
        self._kernel = select_kernel(kernel, self.device)
        self.max_grad_norm = max_grad_norm  # validated by the setter, before any param is packed
        self._loss_scaler = make_loss_scaler(loss_scale)
        self._stats: dict[float, GradStats] = {}
        self._pending_clips: list[tuple[float, float]] = []
        self._warned_no_grads = False
        self.overflow = False
        self._global_grad_norm: Optional[float] = None
        self.last_step_comm_bytes: dict[str, int] = {}
        for index in range(len(self.param_groups)):
            self._buckets.extend(self._make_buckets(index))
        self._reducer = GradReducer(self._buckets, self._plan, reduce_dtype=reduce_dtype, overlap=overlap,
                                    reduce=reduce_gradients)
        self._param_gather = ParamGather(self._plan, [b.params for b in self._buckets],
                                         overlap=overlap_param_gather)

    @property
    def max_grad_norm(self) -> Optional[float]:
        """The 2-norm every ``step()`` clips the averaged gradients to (None: no clipping)."""
        return self._max_grad_norm

    @max_grad_norm.setter
    def max_grad_norm(self, value: Optional[float]) -> None:
        if value is not None and not value > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {value}")
        self._max_grad_norm = None if value is None else float(value)

    @property
    def process_group(self) -> Optional[dist.ProcessGroup]:
        """The data-parallel group (None for a single rank without torch.distributed)."""
        if self._plan.group is not None:
            return self._plan.group
        return dist.group.WORLD if dist.is_available() and dist.is_initialized() else None

    # ---- param groups ---------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (torch semantics); after construction its params get buckets of their own."""
        super().add_param_group(param_group)
        group, index = self.param_groups[-1], len(self.param_groups) - 1
        try:
            check_hyperparameters(group, f"param group {index}")
            check_params(group["params"], self._param_names(index), self._taken)
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise
        if self._reducer is not None:
            buckets = self._make_buckets(index)
            self._param_gather.add_buckets([b.params for b in buckets])
            self._buckets.extend(buckets)
            self._reducer.add_buckets(buckets)

    def _param_names(self, group_index: int) -> list[str]:
        group = self.param_groups[group_index]
        first = sum(len(g["params"]) for g in self.param_groups[:group_index])
        if "param_names" in group:
            return [f"param {name!r}" for name in group["param_names"]]
        return [f"param {first + i} (group {group_index}, shape {tuple(p.shape)}, {p.dtype})"
                for i, p in enumerate(group["params"])]

    def _make_buckets(self, group_index: int) -> list[Bucket]:
        group = self.param_groups[group_index]
        first = sum(len(g["params"]) for g in self.param_groups[:group_index])
        names = self._param_names(group_index)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, p in enumerate(group["params"]):
            by_dtype.setdefault(p.dtype, []).append(i)
        buckets = []
        for dtype, members in by_dtype.items():
            cap = max(1, self._bucket_cap_bytes // torch.empty((), dtype=dtype).element_size())
            order = [(first + i, group["params"][i].numel()) for i in reversed(members)]
            for layout in plan_buckets(order, world_size=self.world_size, bucket_numel=cap):
                local = [s.index - first for s in layout.slots]
                buckets.append(Bucket(layout, [group["params"][i] for i in local],
                                      [names[i] for i in local], group_index, self.rank))
        return buckets

    # ---- the step -----------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None, *, grad_scaler: Any = None) -> Any:
        """Reduce the gradients, update this rank's shards, gather the params. A collective.

        Args:
            closure: re-evaluates the model and returns the loss (optional).
            grad_scaler: passed by ``torch.amp.GradScaler.step``; do not pass it yourself.

        Returns:
            The closure's loss, if any.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.wait_for_gathers()
        loss_scale = self._loss_scale_for_step(grad_scaler)
        stats = self._grad_stats(2.0)                             # 1. reduce into shards
        self.overflow = stats.found_inf
        self._global_grad_norm = stats.norm / loss_scale
        if grad_scaler is not None:
            self._report_to_grad_scaler(grad_scaler, stats.found_inf)
        else:
            self._loss_scaler.update(stats.found_inf)
        if not stats.found_inf:
            multiplier = self._clip_coefficient(loss_scale) / loss_scale
            self._update_shards(stats.has_grad, multiplier)       # 2. fused kernel on own shards
            self._gather_params(stats.has_grad)                   # 3. gather into the params
        self._pending_clips = []
        self._stats = {}
        self.last_step_comm_bytes = dict(self.comm_counter.bytes_by_op)
        self.comm_counter.reset()
        return loss

    def _loss_scale_for_step(self, grad_scaler: Any) -> float:
        if grad_scaler is None:
            return self._loss_scaler.scale
        if self._loss_scaler.scale != 1.0 or type(self._loss_scaler) is not LossScaler:
            raise ValueError("use either ShardedFusedAdam(loss_scale=...) or torch.amp.GradScaler, not both")
        return float(grad_scaler.get_scale())

    def _report_to_grad_scaler(self, grad_scaler: Any, found_inf: bool) -> None:
        # GradScaler.update() reads found_inf_per_device; the stock scaler cannot see our
        # gradient shards, so we record the global verdict there (as Apex's distributed
        # optimizer does), which makes every rank's scaler back off together.
        device = grad_scaler._scale.device
        state = grad_scaler._per_optimizer_states[id(self)]
        state["found_inf_per_device"] = {device: torch.full((), float(found_inf), device=device)}
        if hasattr(grad_scaler, "_has_overflow"):
            # torch_npu's GradScaler inherits this step path but decides update() by its own
            # _has_overflow flag, which only its (here skipped) unscale would set.
            grad_scaler._has_overflow = bool(found_inf)

    def _grad_stats(self, norm_type: float) -> GradStats:
        """Finish the reductions and compute (or reuse) the global gradient facts: a collective."""
        check_unmoved([b.buffer for b in self._buckets])
        if self._reducer.finish():
            self._stats = {}
        if norm_type not in self._stats:
            shards = [b.grad_shard for b in self._buckets if b.grad_valid]
            flags = [flag for b in self._buckets for flag in b.has_grad]
            local = local_stats(shards, flags, norm_type, self.device)
            op = dist.ReduceOp.MAX if norm_type == float("inf") else dist.ReduceOp.SUM
            self._stats[norm_type] = read_stats(self._plan.all_reduce_(local, op), norm_type)
        return self._stats[norm_type]

    def _clip_coefficient(self, loss_scale: float) -> float:
        clips = list(self._pending_clips)
        if self._max_grad_norm is not None:
            clips.append((self._max_grad_norm, 2.0))
        coef = 1.0
        for max_norm, norm_type in clips:
            coef = min(coef, clip_coefficient(self._grad_stats(norm_type).norm / loss_scale, max_norm))
        return coef

    def _bucket_masks(self, has_grad: tuple[bool, ...]) -> Iterator[tuple[Bucket, tuple[bool, ...]]]:
        start = 0
        for bucket in self._buckets:
            n = len(bucket.layout.slots)
            yield bucket, has_grad[start:start + n]
            start += n

    def _update_shards(self, has_grad: tuple[bool, ...], multiplier: float) -> None:
        if not any(has_grad) and not self._warned_no_grads:
            self._warned_no_grads = True
            warnings.warn("step() found no gradient for any parameter on any rank; if the model's "
                          "parameters were replaced (module.weight = ..., load_state_dict(assign=True)) "
                          "after the optimizer was built, it no longer trains them", RuntimeWarning)
        if multiplier != 1.0:
            torch._foreach_mul_([b.grad_shard for b in self._buckets if b.grad_valid], multiplier)
        for bucket, mask in self._bucket_masks(has_grad):
            if self.param_groups[bucket.group_index]["amsgrad"]:
                bucket.ensure_amsgrad_buffer()  # on every rank, even one whose shard is all padding
            segments = bucket.segments_to_update(mask)
            if segments:
                self._run_kernel(bucket, segments)
            bucket.advance_steps(mask)
            bucket.publish_master()

    def _run_kernel(self, bucket: Bucket, segments: list[tuple[int, int, int]]) -> None:
        group = self.param_groups[bucket.group_index]
        beta1, beta2 = (float(b) for b in group["betas"])
        views = bucket.segment_views(tuple((start, end) for start, end, _ in segments))
        amsgrad = bool(group["amsgrad"])
        self._kernel.adam_step(
            views["master"], views["grad"], views["exp_avg"], views["exp_avg_sq"],
            views["max_exp_avg_sq"] if amsgrad else [], [s for _, _, s in segments],
            lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]), amsgrad=amsgrad,
            decoupled=bool(group["decoupled_weight_decay"]),
        )

    def _gather_params(self, has_grad: tuple[bool, ...]) -> None:
        gather = self._param_gather
        wanted = [b for b, (_, mask) in enumerate(self._bucket_masks(has_grad)) if any(mask)]
        for b in gather.gather_order(wanted):
            gather.start(b, self._buckets[b].buffer.flat)
        gather.release()  # waits here unless overlap_param_gather

    def wait_for_gathers(self) -> None:
        """Finish the param gathers the last ``step()`` left in flight (``overlap_param_gather``).

        Not a collective. Reads in this thread wait on their own; call it before reading
        params from another thread or handing them to code that bypasses torch functions.
        """
        self._param_gather.wait_all()

    # ---- gradients, scaling, clipping ------------------------------------------------------
    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip the global norm of the averaged gradients at the next ``step()``; a collective.

        Returns:
            The global ``norm_type`` norm of the averaged gradients, unscaled by this
            optimizer's own loss scale (a ``torch.amp.GradScaler``'s scale is only known at
            ``step()``; ``get_global_grad_norm()`` after the step is always unscaled).

        Raises:
            ValueError: ``max_norm`` <= 0 or ``norm_type`` <= 0.
        """
        max_norm, norm_type = float(max_norm), float(norm_type)
        if not max_norm > 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
        if not norm_type > 0:
            raise ValueError(f"norm_type must be > 0 (or inf), got {norm_type}")
        norm = self._grad_stats(norm_type).norm / self._loss_scaler.scale
        self._pending_clips.append((max_norm, norm_type))
        return torch.tensor(norm)

    def get_global_grad_norm(self) -> Optional[float]:
        """The global 2-norm of the unscaled averaged gradients at the last ``step()``."""
        return self._global_grad_norm

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        """``(loss * loss_scale).backward(**kwargs)`` (DeepSpeed-style loss scaling)."""
        scale = self._loss_scaler.scale
        (loss * scale if scale != 1.0 else loss).backward(**kwargs)

    @property
    def loss_scale(self) -> float:
        return self._loss_scaler.scale

    cur_scale = loss_scale

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop (or zero) the gradient shards and any ``param.grad`` left on the params."""
        self._reducer.zero_grad(set_to_none)
        self._stats = {}
        self._pending_clips = []

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Inside, backward accumulates into ``param.grad`` without communicating; the
        next backward outside (or ``step()``) reduces the sum once."""
        return self._reducer.no_sync()

    # ---- checkpoints ----------------------------------------------------------------------
    def state_dict(self, *, rank0_only: bool = False, offload_to_cpu: bool = True) -> dict[str, Any]:
        """The full state in ``torch.optim.Adam``'s layout (see checkpoint.py). A collective.

        Args:
            rank0_only: return the dict on rank 0 only (``{}`` elsewhere).
            offload_to_cpu: put the state tensors on the CPU (else on the params' device).
        """
        return gather_state_dict(self.shard_state(), rank0_only=rank0_only, offload_to_cpu=offload_to_cpu)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this optimizer (from any world size) or of ``torch.optim.Adam/AdamW``.

        Not a collective: every rank reads the whole dict and keeps its own slices. Restores
        hyperparameters per group like torch. Load the model's params first: fp16/bf16 params
        without a saved ``master_param`` start their fp32 master from the current params.

        Raises:
            ValueError: the dict does not fit this optimizer (nothing is changed then).
        """
        apply_state_dict(self.shard_state(), state_dict)
        self._stats = {}

    def shard_state(self) -> ShardState:
        """The read-only view of this rank's shards that checkpoint formats work on."""
        self.wait_for_gathers()
        return ShardState(tuple(self._buckets), self.param_groups, self._plan, self._loss_scaler,
                          self._kernel.name, self.device)

    def memory_report(self) -> MemoryReport:
        """Bytes this rank holds for params, gradient shards, masters, moments and comm buffers."""
        return memory_report(self._buckets, self.world_size, self._reducer.comm_buffer_bytes())

    @torch.no_grad()
    def refresh_masters(self) -> None:
        """Copy fp16/bf16 params into their fp32 masters after editing params in place."""
        self.wait_for_gathers()
        for bucket in self._buckets:
            if bucket.is_low_precision:
                bucket.master.copy_(bucket.buffer.shard(self.rank))


class ShardedFusedAdamW(ShardedFusedAdam):
    """``ShardedFusedAdam`` with decoupled weight decay (``torch.optim.AdamW``), default 1e-2."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        **kwargs: Any,
    ):
        if "adamw" in kwargs:
            raise TypeError("ShardedFusedAdamW always uses decoupled weight decay; do not pass adamw")
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, adamw=True, **kwargs)

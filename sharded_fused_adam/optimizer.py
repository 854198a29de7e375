"""``ShardedFusedAdam``: the glue that turns buckets, a gradient strategy, a kernel and a comm plan into Adam.

A step reads as its phases (see ``step``): the averaged gradients reach each rank's shards
(reduce), the ranks agree on the global gradient facts (statistics), each rank runs the
fused kernel on its shards (update), and every rank receives the updated shards straight
into the model's params (gather).
"""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
from datetime import timedelta
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import torch
import torch.distributed as dist

from .core.bucket import Bucket, pack_buckets
from .checkpoint.dcp_compat import SteppedState
from .checkpoint.gathered import StateDictCalls, apply_state_dict, gather_state_dict
from .comm.plans import CommCounter, check_reduction_dtypes
from .comm.topology import agree_at_startup, build_plan, check_no_dtensor, resolve_topology
from .core.flat_buffer import adopt_moved, check_unmoved
from .grads.hooks import PRE_REDUCE_HINT
from .kernels import select_kernel
from .core.memory import MemoryReport, memory_report
from .options import ShardingOptions
from .comm.param_gather import ParamGather
from .numerics.clip import holder_of, link_owner
from .numerics.global_facts import clip_factor, grad_stats
from .numerics.precision import GradStats, make_loss_scaler, report_to_grad_scaler, scale_for_step
from .grads.join import JoinableOptimizer
from .grads.reducer import GradReducer
from .grads.replicated import ReplicatedGrads
from .checkpoint.state_view import ShardState
from .comm.startup import newly_trainable, require_process_group
from .core.validation import ParamRegistry, check_params
from .kernels.rule import ADAM, adam_defaults, add_torch_flags, check_hyperparameters

__all__ = ["ShardedFusedAdam", "ShardedFusedAdamW"]


class ShardedFusedAdam(torch.optim.Optimizer, JoinableOptimizer):
    """ZeRO-style sharded fused Adam; a drop-in for ``NpuFusedAdam`` and ``torch.optim.Adam``.

    Trainable params are packed into flat buckets (one per param group and dtype, at most
    ``bucket_cap_mb`` each) and become views into them. Each rank owns one equal shard of
    every bucket: gradients are averaged into that shard during backward, the fused kernel
    updates only that shard (with fp32 masters for fp16/bf16 params), and the shards are
    gathered back into the params. With ``grads="sharded"`` (default) ``param.grad`` is
    None after backward (the optimizer holds the averaged shards): clip with ``max_grad_norm``,
    ``opt.clip_grad_norm_`` or ``sharded_fused_adam.clip_grad_norm_``. ``grads="replicated"``
    keeps the averaged gradients in ``param.grad``, for code that reads them.

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
        maximize: ascend the gradient instead of descending, as torch.optim.Adam's.
        decoupled_weight_decay: torch.optim.Adam's name for ``adamw`` (either turns it on).
        foreach: always fused here, so ``True`` warns (see [Note: torch's implementation
            flags] in kernels/rule.py).
        fused: ``None``/``True`` is what this optimizer does; ``False`` warns.
        capturable: ``True`` (CUDA-graph capture of ``step()``) raises NotImplementedError.
        differentiable: ``True`` (autograd through ``step()``) raises NotImplementedError.
        **options: the fields of ``ShardingOptions`` (process_group, mpu, device_mesh, grads, kernel,
            bucket_cap_mb, overlap, reduce_dtype, comm, max_grad_norm, loss_scale,
            collective_timeout, reduce_gradients, broadcast_params, state_dict_timeout,
            master_weights, state_dtype).

    Raises:
        ValueError: a hyperparameter or option out of range, empty params, a duplicated or
            aliased param, params on several devices, or ranks whose params differ.
        TypeError: a non-tensor param, an unsupported dtype, an unknown option or a value
            of the wrong type.
        NotImplementedError: ``capturable=True`` or ``differentiable=True``.
        RuntimeError: ``foreach=True`` with ``fused=True`` (torch's rule), or a multi-rank
            launch (WORLD_SIZE > 1) without a process group.
    """

    _step_supports_amp_scaling = True  # torch.amp.GradScaler hands itself to step()

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, *, adamw: bool = False,
                 maximize: bool = False, decoupled_weight_decay: bool = False, foreach: Optional[bool] = None,
                 fused: Optional[bool] = None, capturable: bool = False, differentiable: bool = False,
                 **options: Any):
        if isinstance(params, torch.Tensor):
            raise TypeError("params must be an iterable of Tensors or dicts (e.g. model.parameters()), "
                            f"got a single Tensor of shape {tuple(params.shape)}")
        params = list(params)
        if not params:
            raise ValueError("params is empty: ShardedFusedAdam needs at least one parameter")
        defaults = adam_defaults(lr, betas, eps, weight_decay, amsgrad, adamw, maximize=maximize,
                                 decoupled_weight_decay=decoupled_weight_decay, foreach=foreach, fused=fused,
                                 capturable=capturable, differentiable=differentiable)
        opts = ShardingOptions.from_kwargs(options)
        require_process_group(opts.process_group)
        self._topology = resolve_topology(opts.process_group, opts.mpu, opts.device_mesh)  # [Note: topology]
        if self._topology.source != "process_group":
            check_no_dtensor(params)
        self._registry = ParamRegistry()
        self._buckets: list[Bucket] = []
        self._idle: list[torch.Tensor] = []
        self._grads: Optional[Union[GradReducer, ReplicatedGrads]] = None
        self._param_gather: Optional[ParamGather] = None
        super().__init__(params, defaults)
        if not self._registry:
            raise ValueError("params is empty: every param group has an empty 'params' list")
        self.device = self._registry.device
        self.comm_counter = CommCounter()
        timeout = timedelta(seconds=opts.collective_timeout) if opts.collective_timeout is not None else None
        self._plan = build_plan(self._topology, self.device, opts.comm, self.comm_counter, timeout)
        check_reduction_dtypes(self._plan, {p.dtype for g in self.param_groups for p in g["params"]})
        self.rank, self.world_size = self._plan.rank, self._plan.world_size  # in the shard group
        self._options = dataclasses.replace(opts, process_group=None, device_mesh=None)  # no group ref kept
        self._kernel = select_kernel(opts.kernel, self.device)
        add_torch_flags(self.param_groups, self._kernel.name)
        self._state_dict_calls = StateDictCalls(self._plan, opts.state_dict_timeout)
        self.max_grad_norm = opts.max_grad_norm
        self._loss_scaler = make_loss_scaler(opts.loss_scale)
        self._stats: dict[float, GradStats] = {}
        self._pending_clips: list[tuple[float, float]] = []
        self._warned: set[str] = set()
        self._version = 0  # bumps whenever the state changes (step, load): invalidates a snapshot
        self.overflow = False
        self._global_grad_norm: Optional[float] = None
        self.last_step_comm_bytes: dict[str, int] = {}
        agree_at_startup(self._plan, self.param_groups, self.device, broadcast=opts.broadcast_params)
        for index in range(len(self.param_groups)):
            self._buckets.extend(self._make_buckets(index))
        self._grads = self._make_gradient_strategy(self._buckets)
        self._param_gather = ParamGather(self._plan, [b.params for b in self._buckets],
                                         overlap=opts.overlap_param_gather)
        self._idle = self._find_idle()
        self._state_dict_calls.serve(self, self._buckets)  # state_dict() on one rank alone
        self.state = SteppedState(self._buckets)  # [Note: optimizer.state is truthy once stepped]

    def _make_gradient_strategy(self, buckets: list[Bucket]) -> Union[GradReducer, ReplicatedGrads]:
        """ZeRO-2 (``GradReducer``, with the watch of [Note: watching param.grad]) or ZeRO-1."""
        o = self._options
        if o.grads == "replicated":
            link_owner((p for b in buckets for p in b.params), self)  # no grad watch holds the link
            return ReplicatedGrads(buckets, self._plan, reduce_dtype=o.reduce_dtype, overlap=o.overlap)
        hint = PRE_REDUCE_HINT if self._topology.model_parallel else ""
        return GradReducer(buckets, self._plan, reduce_dtype=o.reduce_dtype, overlap=o.overlap,
                           reduce=o.reduce_gradients, owner=self, read_none_hint=hint)

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
    def options(self) -> ShardingOptions:
        """The options this optimizer was built with (``process_group`` not kept: see below)."""
        return self._options

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
            check_params(group["params"], self._param_names(index), self._registry, holder_of)
        except (TypeError, ValueError, RuntimeError):
            self.param_groups.pop()
            raise
        if self._grads is not None:
            add_torch_flags([group], self._kernel.name)
            self._add_buckets(self._make_buckets(index))
            self._idle = self._find_idle()

    def _add_buckets(self, buckets: list[Bucket]) -> None:
        self._buckets.extend(buckets)
        self._param_gather.add_buckets([b.params for b in buckets])
        if self._options.grads == "replicated":
            link_owner((p for b in buckets for p in b.params), self)
        self._grads.add_buckets(buckets)

    def _param_names(self, group_index: int) -> list[str]:
        group = self.param_groups[group_index]
        first = sum(len(g["params"]) for g in self.param_groups[:group_index])
        if "param_names" in group:
            return [f"param {name!r}" for name in group["param_names"]]
        return [f"param {first + i} (group {group_index}, shape {tuple(p.shape)}, {p.dtype})"
                for i, p in enumerate(group["params"])]

    def _find_idle(self) -> list[torch.Tensor]:
        """Params with no bucket: frozen at construction, or empty."""
        bucketed = {id(p) for b in self._buckets for p in b.params}
        return [p for g in self.param_groups for p in g["params"] if id(p) not in bucketed]

    def _make_buckets(self, group_index: int, only: Optional[set[int]] = None) -> list[Bucket]:
        """Buckets for the group's trainable, non-empty params (frozen ones cost nothing)."""
        group = self.param_groups[group_index]
        first = sum(len(g["params"]) for g in self.param_groups[:group_index])
        members = [i for i, p in enumerate(group["params"])
                   if p.requires_grad and p.numel() > 0 and (only is None or id(p) in only)]
        return pack_buckets(group["params"], members, self._param_names(group_index), group_index=group_index,
                            first_index=first, world_size=self.world_size, rank=self.rank,
                            bucket_cap_mb=self._options.bucket_cap_mb, master_weights=self._options.master_weights,
                            state_dtype=self._options.state_dtype, offload=self._options.offload,
                            reads_in_place=self._kernel.reads_in_place)

    def _adopt_unfrozen(self) -> None:
        """Give params that became trainable since construction buckets of their own (a collective)."""
        new = newly_trainable(self._plan, self._idle, self.param_groups, self.device)
        if new:
            self._add_buckets([b for gi in range(len(self.param_groups)) for b in self._make_buckets(gi, new)])
            self._idle = self._find_idle()

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
        self._reduce()                                            # 1. reduce
        stats = self._grad_stats(2.0)                             # 2. statistics
        self._record_verdict(stats, loss_scale, grad_scaler)
        if not stats.found_inf:
            multiplier = self._clip_coefficient(loss_scale) / loss_scale
            self._update_shards(stats.has_grad, multiplier)       # 3. update own shards, start gathers
            self._gather_params()                                 # 4. gathers into the params end
        self._grads.end_step()
        self._pending_clips, self._stats = [], {}
        self._version += 1
        self.last_step_comm_bytes = dict(self.comm_counter.bytes_by_op)
        self.comm_counter.reset()
        return loss

    def _loss_scale_for_step(self, grad_scaler: Any) -> float:
        return scale_for_step(self._loss_scaler, grad_scaler)

    def _reduce(self) -> None:
        """Finish every reduction so the shards hold the averaged gradients: a collective."""
        check_unmoved([b.buffer for b in self._buckets])
        self._adopt_unfrozen()
        if self._grads.finish():
            self._stats = {}

    def _record_verdict(self, stats: GradStats, loss_scale: float, grad_scaler: Any) -> None:
        self.overflow = stats.found_inf
        self._global_grad_norm = stats.norm / loss_scale
        if grad_scaler is not None:
            report_to_grad_scaler(grad_scaler, id(self), stats.found_inf)
            return
        self._loss_scaler.update(stats.found_inf)  # a static scale warns about skipped steps

    def _grad_stats(self, norm_type: float) -> GradStats:
        """The global gradient facts (overflow, norm, which params have a gradient): a collective, cached."""
        if norm_type not in self._stats:
            t = self._topology  # with an mpu: TP duplicates and tied copies count once ([Note: topology])
            self._stats[norm_type] = grad_stats(self._buckets, self._plan, t.counts_in_norm,
                                                not t.model_parallel, norm_type, self.device)
        return self._stats[norm_type]

    def _clip_coefficient(self, loss_scale: float) -> float:
        return clip_factor(self._pending_clips, self._max_grad_norm, self._grad_stats, loss_scale)

    def _bucket_masks(self, has_grad: tuple[bool, ...]) -> Iterator[tuple[Bucket, tuple[bool, ...]]]:
        start = 0
        for bucket in self._buckets:
            n = len(bucket.layout.slots)
            yield bucket, has_grad[start:start + n]
            start += n

    def _update_shards(self, has_grad: tuple[bool, ...], multiplier: float) -> None:
        if not any(has_grad):
            self._warn_once("no_grads", (
                "step() found no gradient for any parameter on any rank. If the model's parameters were replaced "
                "(module.weight = ..., load_state_dict(assign=True), model.to()/.cpu() across device types, which "
                "builds new Parameters in stock torch) after the optimizer was built, it no longer trains them."))
        if multiplier != 1.0:
            self._grads.scale_(multiplier)
        masks = [mask for _, mask in self._bucket_masks(has_grad)]
        wanted = self._param_gather.gather_order([b for b, mask in enumerate(masks) if any(mask)])
        started = set(wanted)
        for b in wanted + [b for b in range(len(masks)) if b not in started]:
            bucket, mask = self._buckets[b], masks[b]
            if self.param_groups[bucket.group_index]["amsgrad"]:
                bucket.ensure_amsgrad_buffer()  # on every rank, even one whose shard is all padding
            segments = bucket.segments_to_update(mask)
            if segments:
                self._run_kernel(bucket, segments)
            bucket.advance_steps(mask)
            bucket.publish_master()
            if any(mask):  # pipelined: this bucket's gather overlaps the next buckets' updates
                self._param_gather.start(b, bucket.buffer.flat)

    def _run_kernel(self, bucket: Bucket, segments: list[tuple[int, int, int]]) -> None:
        g = self.param_groups[bucket.group_index]
        bucket.update(segments, self._kernel.adam_step, **ADAM.kernel_scalars(g))

    def _gather_params(self) -> None:
        self._param_gather.release()  # waits here for the gathers unless overlap_param_gather

    def wait_for_gathers(self) -> None:
        """Finish the param gathers the last ``step()`` left in flight (``overlap_param_gather``).

        Not a collective. Reads in this thread wait on their own; call it before reading
        params from another thread or handing them to code that bypasses torch functions.
        """
        self._param_gather.wait_all()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=4)

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
        self._reduce()
        norm = self._grad_stats(norm_type).norm / self._loss_scaler.scale
        self._pending_clips.append((max_norm, norm_type))
        return torch.tensor(norm)

    clip_grad_norm = clip_grad_norm_  # the name the Hugging Face Trainer looks for

    @torch.no_grad()
    def clip_grad_value_(self, clip_value: float) -> None:
        """Clamp every averaged gradient to ``[-clip_value, clip_value]`` now; a collective.

        Raises:
            ValueError: ``clip_value`` < 0.
        """
        clip_value = float(clip_value)
        if not clip_value >= 0:
            raise ValueError(f"clip_value must be >= 0, got {clip_value}")
        self._reduce()
        if self._pending_clips:  # a norm clip asked for earlier applies first, as in torch
            self._grads.scale_(clip_factor(self._pending_clips, None, self._grad_stats, self._loss_scaler.scale))
            self._pending_clips = []
        self._grads.clamp_(clip_value * self._loss_scaler.scale)
        self._stats = {}

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
        """Drop (or zero) the gradients, wherever they live (shards or ``param.grad``)."""
        self._grads.zero_grad(set_to_none)
        for p in self._idle:  # frozen and empty params, which have no bucket
            if p.grad is not None:
                p.grad = None if set_to_none else p.grad.detach_().zero_()
        self._stats, self._pending_clips = {}, []

    def register_pre_reduce_hook(self, hook: Callable[[], None]) -> torch.utils.hooks.RemovableHandle:
        """Run ``hook()`` while the gradients are still in ``param.grad``, before they are reduced:
        the place for model-parallel gradient reductions ([Note: pre-reduce hooks] in grads/hooks.py)."""
        return self._grads.register_pre_reduce_hook(hook)

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Inside, backward accumulates into ``param.grad`` without communicating; the
        next backward outside (or ``step()``) reduces the sum once."""
        return self._grads.no_sync()

    # ---- checkpoints ----------------------------------------------------------------------
    def state_dict(self, *, rank0_only: bool = False, offload_to_cpu: bool = True) -> dict[str, Any]:
        """The full state in ``torch.optim.Adam``'s layout (see checkpoint.py). A collective.

        On a gloo group any rank may call it alone (the others' threads serve their shards, see
        served.py); else every rank must, unless ``snapshot_state_dict()`` ran on all since the last step.

        Args:
            rank0_only: return the dict on rank 0 only (``{}`` elsewhere).
            offload_to_cpu: put the state tensors on the CPU (else on the params' device).

        Raises:
            CollectiveError: a rank did not call it (or serve) within ``state_dict_timeout`` seconds.
        """
        return self._state_dict_calls.gathered(self._version, rank0_only, lambda fill: gather_state_dict(
            self._view(), rank0_only=rank0_only, offload_to_cpu=offload_to_cpu, fill=fill))

    def snapshot_state_dict(self) -> None:
        """Gather the state dict on every rank (a collective) and keep it until the next step or load."""
        self._state_dict_calls.snapshot(self._version, lambda fill: gather_state_dict(
            self._view(), rank0_only=False, offload_to_cpu=True, fill=fill))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this optimizer (from any world size) or of ``torch.optim.Adam/AdamW``.

        Not a collective: every rank reads the whole dict and keeps its own slices. Restores
        hyperparameters per group like torch. Load the model's params first: fp16/bf16 params
        without a saved ``master_param`` start their fp32 master from the current params.

        Raises:
            ValueError: the dict does not fit this optimizer (nothing is changed then).
        """
        shards = self._view()
        adopt_moved([b.buffer for b in self._buckets])  # the framework loaded the model first, maybe into copies
        apply_state_dict(shards, state_dict)
        self._stats, self._version = {}, self._version + 1

    def shard_state(self) -> ShardState:
        """The view of this rank's shards that checkpoint formats work on (a loader may write
        through ``Bucket.load_state``, so a state-dict snapshot is dropped)."""
        self._version += 1
        return self._view()

    def _view(self) -> ShardState:
        self.wait_for_gathers()
        return ShardState(tuple(self._buckets), self.param_groups, self._plan, self._loss_scaler,
                          self._kernel.name, self.device)

    def memory_report(self) -> MemoryReport:
        """Bytes this rank holds for params, gradients, masters, moments and comm buffers."""
        return memory_report(self._buckets, self.world_size, self._grads.comm_buffer_bytes())

    @torch.no_grad()
    def refresh_masters(self) -> None:
        """Copy fp16/bf16 params into their fp32 masters after editing params in place."""
        self.wait_for_gathers()
        for bucket in self._buckets:
            bucket.refresh_master()


class ShardedFusedAdamW(ShardedFusedAdam):
    """``ShardedFusedAdam`` with decoupled weight decay (``torch.optim.AdamW``), default 1e-2."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, **kwargs: Any):
        for key in ("adamw", "decoupled_weight_decay"):  # torch.optim.AdamW takes neither
            if key in kwargs:
                raise TypeError(f"ShardedFusedAdamW always uses decoupled weight decay; do not pass {key}")
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, adamw=True, **kwargs)

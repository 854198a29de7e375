"""Replicated gradients (ZeRO-1): the averaged gradient stays in ``param.grad``, as views into flat buffers.

[Note: replicated gradients]
Each bucket gets a flat gradient buffer in the params' dtype, laid out like its flat params,
and every ``param.grad`` is a view into it (DDP's ``gradient_as_bucket_view``). Backward
accumulates into the views in place; a gradient that autograd created afresh (after
``zero_grad()`` set ``param.grad`` to None) or that was set by hand is copied into its view
and ``param.grad`` is pointed back at the view. When a bucket is complete its buffer is
all-reduced (in ``reduce_dtype``; with hybrid sharding over the shard group, then the
replicate group) and divided by the data-parallel size, and the callback that ends
backward waits for every bucket: after backward, ``param.grad`` holds the averaged gradient
on every rank, as with DDP, so ``torch.nn.utils.clip_grad_norm_``, ``clip_grad_value_``,
per-layer norms, gradient hooks and ``GradScaler.unscale_`` work unchanged. Zeroing is the
user's, exactly as in torch. ``finish()`` copies this rank's shard of each buffer into the
optimizer's gradient shard (a view for fp32/fp64 params, so nothing is copied). Costs: the
full gradient stays resident (Ψ × param bytes, like DDP) and gradients are all-reduced on
every backend (on NCCL/HCCL twice the bytes of the sharded path's reduce-scatter).
One presence flag per param rides in each bucket's all-reduce, so a param without a
gradient on any rank keeps ``param.grad`` None and is skipped, as in torch, while one with
a gradient on some ranks only gets the average (zeros elsewhere) on every rank.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ..core.bucket import LOW_PRECISION, Bucket
from ..comm.plans import CommPlan, Pending
from .grad_watch import GradPhase, raw_grad, release_when_collected, set_raw_grad
from .hooks import SyncSwitch, register_grad_hook

__all__ = ["ReplicatedGrads"]


@dataclass(eq=False)
class _GradBucket:
    """One bucket's flat gradient buffer, the views the params hold, and its round's state."""

    index: int
    bucket: Bucket
    flat_grad: torch.Tensor
    views: list[torch.Tensor]
    comm_dtype: torch.dtype
    expected: int = 0
    num_filled: int = 0
    pending: Optional[Pending] = None
    comm_buffer: Optional[torch.Tensor] = None
    filled: list[bool] = field(default_factory=list)


class ReplicatedGrads(SyncSwitch):
    """Keeps the averaged gradients in ``param.grad`` (see [Note: replicated gradients]).

    Args:
        buckets: all buckets, in index order.
        plan: the collectives to use.
        reduce_dtype: dtype in which fp16/bf16 gradients are summed across ranks.
        overlap: start each bucket's all-reduce during backward as soon as it is complete.
    """

    reduces = True

    def __init__(self, buckets: Sequence[Bucket], plan: CommPlan, *, reduce_dtype: torch.dtype, overlap: bool):
        self._plan = plan
        self._reduce_dtype = reduce_dtype
        self._overlap = overlap
        self._records: list[_GradBucket] = []
        self._where: dict[int, tuple[_GradBucket, int]] = {}
        self._hooks: list = []
        release_when_collected(self, self._hooks)
        self.phase = GradPhase.STEPPED  # BACKWARD: some param.grad holds local gradients not reduced yet
        self._sync = True
        self._callback_queued = False
        self._next = 0  # buckets launch in index order on every rank (collectives must match)
        self.add_buckets(buckets)

    def add_buckets(self, buckets: Sequence[Bucket]) -> None:
        """Take over more buckets; their params' ``grad`` become views into a new flat buffer."""
        for bucket in buckets:
            # After the padded gradients, one presence flag per param travels in the same
            # all-reduce: afterwards every rank knows which params had a gradient on any rank.
            padded = bucket.layout.padded_numel
            flat = torch.zeros(padded + len(bucket.params), dtype=bucket.buffer.dtype, device=bucket.buffer.device)
            views = [flat.narrow(0, s.offset, s.numel).view(p.shape) for s, p in zip(bucket.layout.slots, bucket.params)]
            dtype = self._reduce_dtype if bucket.buffer.dtype in LOW_PRECISION else bucket.buffer.dtype
            record = _GradBucket(len(self._records), bucket, flat, views, dtype, filled=[False] * len(views))
            if not bucket.is_low_precision:
                bucket.adopt_grad_shard(self._plan.own_shard(flat.narrow(0, 0, padded)))
            for slot, p in enumerate(bucket.params):
                self._where[id(p)] = (record, slot)
                if p.requires_grad:
                    self._hooks.append(register_grad_hook(p, self))
                    record.expected += 1
            self._records.append(record)

    @property
    def num_launched(self) -> int:
        return sum(r.pending is not None for r in self._records)

    def _adopt(self, record: _GradBucket, slot: int) -> bool:
        """Make the param's grad its view; False if the param has no gradient."""
        p, view = record.bucket.params[slot], record.views[slot]
        grad = raw_grad(p)
        if grad is None:
            return False
        if grad is not view:
            if grad.shape != p.shape or grad.dtype != p.dtype:
                raise RuntimeError(f"{record.bucket.buffer.names[slot]} has a gradient of shape "
                                   f"{tuple(grad.shape)} and dtype {grad.dtype}; the param has shape "
                                   f"{tuple(p.shape)} and dtype {p.dtype}")
            view.copy_(grad)
            set_raw_grad(p, view)
        return True

    def on_grad_ready(self, param: torch.Tensor) -> None:
        record, slot = self._where[id(param)]
        self._adopt(record, slot)
        self.phase = GradPhase.BACKWARD
        if not self._sync:
            return
        if not self._callback_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
            self._callback_queued = True
        if not record.filled[slot]:
            record.filled[slot] = True
            record.num_filled += 1
        if self._overlap and not self.has_pre_reduce_hooks:  # hooks run before anything is launched
            while self._next < len(self._records) and \
                    self._records[self._next].num_filled >= self._records[self._next].expected:
                self._launch(self._records[self._next])
                self._next += 1

    def _end_of_backward(self) -> None:
        self._callback_queued = False
        self.run_pre_reduce_hooks()
        for record in self._records:
            self._launch(record)
        self._next = 0
        self._wait_all()

    def _launch(self, record: _GradBucket) -> None:
        if record.pending is not None:
            return
        bucket = record.bucket
        flags = []
        for slot in range(len(record.views)):
            present = self._adopt(record, slot)
            flags.append(1.0 if present else 0.0)
            if not present:
                record.views[slot].zero_()  # counts as zero here; other ranks may have one
        flat = record.flat_grad
        flat.narrow(0, bucket.layout.padded_numel, len(flags)).copy_(torch.tensor(flags, dtype=flat.dtype))
        if record.comm_dtype != flat.dtype:
            record.comm_buffer = flat.to(record.comm_dtype)
            flat = record.comm_buffer
        record.pending = self._plan.all_reduce(flat, f"gradients of bucket {record.index}")

    def _wait_all(self) -> None:
        for record in self._records:
            if record.pending is None:
                continue
            summed = record.pending.wait()
            if self._plan.replicate is not None:
                self._plan.replicate.all_reduce(summed, f"gradients of bucket {record.index}").wait()
            if self._plan.divisor > 1:
                summed.div_(self._plan.divisor)
            if summed is not record.flat_grad:
                record.flat_grad.copy_(summed)
            present = record.flat_grad.narrow(0, record.bucket.layout.padded_numel, len(record.views)).tolist()
            for slot, p in enumerate(record.bucket.params):
                set_raw_grad(p, record.views[slot] if present[slot] > 0 else None)
            record.pending, record.comm_buffer = None, None
            self.phase = GradPhase.REDUCED
            record.filled = [False] * len(record.views)
            record.num_filled = 0

    def finish(self) -> bool:
        """Reduce gradients set by hand or accumulated under ``no_sync()``; fill the shards. A collective."""
        handset = any(raw_grad(p) is not None and raw_grad(p) is not r.views[slot]
                      for r in self._records for slot, p in enumerate(r.bucket.params))
        dirty = handset or self.phase is GradPhase.BACKWARD
        if self._plan.any_rank(dirty, self._records[0].bucket.buffer.device):
            self.run_pre_reduce_hooks()
            for record in self._records:
                self._launch(record)
            self._wait_all()
        for record in self._records:
            bucket = record.bucket
            bucket.has_grad = [raw_grad(p) is not None for p in bucket.params]
            if bucket.is_low_precision:
                bucket.grad_shard.copy_(self._plan.own_shard(record.flat_grad.narrow(0, 0, bucket.layout.padded_numel)))
            bucket.grad_valid = True
        return True

    def end_step(self) -> None:
        """Gradients outlive the step in ``param.grad``, as in torch."""
        self.phase = GradPhase.STEPPED

    def scale_(self, multiplier: float) -> None:
        """Scale every averaged gradient in ``param.grad`` (loss-scale removal and clipping)."""
        tensors = [r.flat_grad for r in self._records]
        tensors += [r.bucket.grad_shard for r in self._records if r.bucket.is_low_precision]
        torch._foreach_mul_(tensors, multiplier)

    def clamp_(self, value: float) -> None:
        """Clamp every averaged gradient in ``param.grad`` elementwise (``clip_grad_value_``)."""
        for r in self._records:
            r.flat_grad.clamp_(-value, value)
            if r.bucket.is_low_precision:
                r.bucket.grad_shard.clamp_(-value, value)

    def zero_grad(self, set_to_none: bool) -> None:
        """torch's ``zero_grad``: drop ``param.grad`` or zero it in place."""
        self._wait_all()
        for record in self._records:
            for p in record.bucket.params:
                grad = raw_grad(p)
                if grad is None:
                    continue
                if set_to_none:
                    set_raw_grad(p, None)
                    continue
                if grad.grad_fn is not None:  # torch's rule; our views into the buffer cannot detach_()
                    grad.detach_()
                else:
                    grad.requires_grad_(False)
                grad.zero_()
        self.phase = GradPhase.STEPPED

    def comm_buffer_bytes(self) -> int:
        return sum(r.flat_grad.numel() * r.flat_grad.element_size() for r in self._records)

"""Sharded gradients (ZeRO-2): backward hooks copy grads into bucket buffers and reduce them into shards.

[Note: gradient path]
A post-accumulate-grad hook on every trainable param copies ``param.grad`` into its slot
of a pooled communication buffer and frees it (``param.grad = None``), so after backward
the model holds no gradients: only each rank's reduced gradient shard survives (ZeRO-2).
A bucket's reduction starts as soon as all its params have reported, but buckets always
start in one fixed order on every rank (collectives must match), so a bucket waits for
those before it. That order is learned in the first backward, which only records when
each bucket completes; rank 0's observation is broadcast and kept. A callback queued on
the autograd engine ends every backward: it starts the buckets still waiting (params
without a gradient count as zeros). ``finish()`` waits for all reductions and folds each
rank's summed slice (with hybrid sharding: summed over the replicate group next), divided
by the data-parallel size (shard x replicate, [Note: topology]), into its gradient shard;
gradients set by hand (``param.grad = ...``) or accumulated under ``no_sync()`` are
collected there too.
The shards outlive the step as ``param.grad`` does in torch; zeroing done elsewhere
(``model.zero_grad()``, ``param.grad = ...``) reaches them through
[Note: watching param.grad].
Every rank must run the same number of backward passes per step, as with DDP.

[Note: comm pool]
At most ``max_inflight + 1`` bucket buffers, plus (send/recv, ``N`` ranks) ``N - 2`` receive
shards per reduction in flight: its empty gradient shard is lent to the plan as an output.
On an accelerator the pool is dropped after ``finish()``, so forward's activations reuse it
(a caching allocator hands the blocks back for free); on CPU it is kept, as glibc unmaps
blocks this size and re-faulting them made the anchor step 1.31x slower (docs/benchmarks.md).

[Note: DDP-wrapped models]
A model wrapped in ``DistributedDataParallel`` (directly, by Accelerate or by the Hugging
Face Trainer) has its gradients averaged by DDP, which writes them into ``param.grad`` when
its backward ends. At the first backward the reducer looks for a live DDP module holding
these params (``find_ddp``); if there is one, it stops reducing and from then on takes
each rank's slice of DDP's averaged gradient at ``finish()``, leaving ``param.grad`` in
place as torch does. ``reduce_gradients=False`` forces that path, ``True`` forbids it.
DDP's group must be the optimizer's data-parallel ranks (``check_ddp_group`` in ddp.py).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ..core.bucket import LOW_PRECISION, Bucket
from ..comm.plans import CommPlan, Pending
from .grad_watch import GradPhase, GradWatch, raw_grad, release_when_collected, set_raw_grad
from .ddp import check_ddp_group, find_ddp
from .hooks import SyncSwitch, register_grad_hook

__all__ = ["GradReducer", "find_ddp", "check_ddp_group", "register_grad_hook", "SyncSwitch"]


class _CommBuffer:
    """A pooled buffer; the per-slot views of each bucket it served are kept (making a view
    costs ~10 us, about as much as copying a small gradient)."""

    __slots__ = ("tensor", "owner", "_views")

    def __init__(self, tensor: torch.Tensor, owner: int = -1):
        self.tensor = tensor
        self.owner = owner  # bucket whose gaps are known to be zero
        self._views: dict[int, list[torch.Tensor]] = {}

    def slot_views(self, b: int, bucket: Bucket) -> list[torch.Tensor]:
        views = self._views.get(b)
        if views is None:
            views = self._views[b] = [self.tensor.narrow(0, s.offset, s.numel).view(p.shape)
                                      for s, p in zip(bucket.layout.slots, bucket.params)]
        return views


@dataclass(eq=False)
class _Record:
    """One bucket: fixed facts the hot path reads, and the state of the current round."""

    index: int
    bucket: Bucket
    comm_dtype: torch.dtype
    in_place: bool  # the plan moves nothing and the dtypes match: grads land in the shard itself
    predivide: bool  # an fp16 sum over ranks can overflow where the average would not
    gaps: tuple[tuple[int, int], ...]
    expected: int = 0  # hooked params: the bucket is complete when all of them reported
    filled: list[bool] = field(default_factory=list)
    num_filled: int = 0
    launched: bool = False
    buffer: Optional[_CommBuffer] = None
    shard_buffer: Optional[_CommBuffer] = None  # the in-place path's buffer (keeps its slot views)
    lent: bool = False  # the gradient shard is lent to a reduction in flight as its output buffer

    def new_round(self) -> None:
        self.filled = [False] * len(self.bucket.params)
        self.num_filled = 0
        self.launched = False
        self.buffer = None

    @property
    def complete(self) -> bool:
        return self.num_filled >= self.expected


class _SumOverRanks:
    """Gradients are this rank's own: sum them over ranks, then divide by the world size."""

    reduces = True  # so backward hooks collect the gradients

    def __init__(self, plan: CommPlan):
        self.plan, self.divisor = plan, plan.divisor

    def start(self, flat: torch.Tensor, out: Optional[torch.Tensor], what: str) -> Pending:
        """Start the reduction of ``flat``; ``out``: a shard-sized buffer the plan may write into."""
        return self.plan.reduce(flat, out, what)

    def collected(self, p: torch.Tensor) -> None:
        set_raw_grad(p, None)  # the gradient now lives in the comm buffer


class _AlreadyAveraged:
    """Gradients were averaged already (see [Note: DDP-wrapped models]): keep this rank's slice."""

    reduces = False
    divisor = 1

    def __init__(self, plan: CommPlan):
        self.plan = plan

    def start(self, flat: torch.Tensor, out: Optional[torch.Tensor], what: str) -> Pending:
        return Pending([], self.plan.own_shard(flat))

    def collected(self, p: torch.Tensor) -> None:
        """DDP's gradients stay in ``param.grad``, where torch leaves them."""


class GradReducer(SyncSwitch):
    """Moves gradients from params into reduced shards (see [Note: gradient path]).

    Args:
        buckets: all buckets, in index order.
        plan: the collectives to use.
        reduce_dtype: dtype to communicate fp16/bf16 gradients in (fp32/fp64 grads travel as is).
        overlap: start each bucket's reduction during backward; False waits for its end.
        reduce: True: always reduce; False: gradients arrive averaged (DDP); None: find out
            at the first backward (see [Note: DDP-wrapped models]).
        max_inflight: reductions in flight before a new buffer waits for the oldest. 4 measured
            faster than 2 on gloo (backward stalled in ``_acquire``) and no slower than 8; it
            bounds the buffer pool at 4 buckets.
        owner: the optimizer, which ``clip_grad_norm_`` finds through the params' watch (see
            [Note: watching param.grad]; the watch ends when this reducer is collected).
        read_none_hint: added to the warning about a ``param.grad`` read as None before
            ``step()`` (e.g. where to reduce model-parallel gradients instead).
    """

    def __init__(
        self,
        buckets: Sequence[Bucket],
        plan: CommPlan,
        *,
        reduce_dtype: torch.dtype,
        overlap: bool,
        reduce: Optional[bool] = None,
        max_inflight: int = 4,
        owner: object = None,
        read_none_hint: str = "",
    ):
        self._plan = plan
        self._reduce_dtype = reduce_dtype
        self._overlap = overlap
        self._averaging = _AlreadyAveraged(plan) if reduce is False else _SumOverRanks(plan)
        self._detect_ddp = reduce is None
        self._max_inflight = max_inflight
        self._records: list[_Record] = []
        self._where: dict[int, tuple[_Record, int]] = {}
        self._hooks: list = []
        self._order: list[int] | None = None  # None until the first backward taught it
        self._arrivals: list[int] = []
        self._next = 0  # position in the order of the next bucket to launch
        self._inflight: deque[tuple[_Record, Pending, _CommBuffer]] = deque()
        self._pool: dict[torch.dtype, list[_CommBuffer]] = {}
        self._sync = True
        self._callback_queued = False
        self._reduced_since_finish = False
        self.phase = GradPhase.STEPPED
        self._watch = GradWatch(self, owner, read_none_hint)
        release_when_collected(self, self._hooks, self._watch)
        self.add_buckets(buckets)

    # ---- construction -------------------------------------------------------------------
    def add_buckets(self, buckets: Sequence[Bucket]) -> None:
        """Take over more buckets (``add_param_group``, unfrozen params); they join the end of the order."""
        for bucket in buckets:
            comm_dtype = self._reduce_dtype if bucket.buffer.dtype in LOW_PRECISION else bucket.buffer.dtype
            record = _Record(len(self._records), bucket, comm_dtype,
                             self._plan.moves_nothing and comm_dtype == bucket.grad_shard.dtype,
                             comm_dtype == torch.float16 and self._averaging.divisor > 1, bucket.layout.gaps())
            record.new_round()
            self._records.append(record)
            for slot, p in enumerate(bucket.params):
                self._where[id(p)] = (record, slot)
                if p.requires_grad and self._averaging.reduces:
                    self._hook_param(p, record)
            self._watch.add(bucket.params)
            if self._order is not None:
                self._order.append(record.index)

    def _hook_param(self, p: torch.Tensor, record: _Record) -> None:
        self._hooks.append(register_grad_hook(p, self))
        record.expected += 1

    @property
    def reduces(self) -> bool:
        """False once the gradients are known to arrive averaged (a DDP-wrapped model)."""
        return self._averaging.reduces

    @property
    def num_launched(self) -> int:
        """Buckets of the current backward whose reduction has started."""
        return sum(r.launched for r in self._records)

    # ---- backward -----------------------------------------------------------------------
    def on_grad_ready(self, param: torch.Tensor) -> None:
        if self._detect_ddp:
            self._detect_ddp = False
            ddp = find_ddp([p for r in self._records for p in r.bucket.params])
            if ddp is not None:
                check_ddp_group(ddp, self._plan)
                self._averaging = _AlreadyAveraged(self._plan)
                self.remove_hooks()
                return
        if self.phase is not GradPhase.BACKWARD:
            self._forget_touched()
            self.phase = GradPhase.BACKWARD
        if not self._sync:
            return
        record, slot = self._where[id(param)]
        if not self._callback_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
            self._callback_queued = True
        if self._order is None:  # first backward: only learn the completion order
            record.num_filled += 1
            if record.complete:
                self._arrivals.append(record.index)
            return
        if self.has_pre_reduce_hooks:
            return  # taken at the end of backward, after the hooks ran
        if record.launched or record.filled[slot]:
            return  # collected at finish() instead
        self._copy_in(record, slot)
        if self._overlap and record.complete:
            self._launch_ready()

    def _launch_ready(self) -> None:
        """Launch, in the agreed order, every bucket up to the first incomplete one."""
        while self._next < len(self._order):
            record = self._records[self._order[self._next]]
            if not record.complete:
                break
            self._launch(record)
            self._next += 1

    def _end_of_backward(self) -> None:
        self._callback_queued = False
        self._flush()

    def _flush(self) -> None:
        self.run_pre_reduce_hooks()
        if self._order is None:
            self._order = self._agree_on_order()
        for b in self._order[self._next:]:
            self._launch(self._records[b])
        for record in self._records:
            record.new_round()
        self._next = 0
        self._reduced_since_finish = True
        if self.reduces:
            self.phase = GradPhase.REDUCED

    def _agree_on_order(self) -> list[int]:
        seen = list(dict.fromkeys(self._arrivals))
        local = seen + [r.index for r in self._records if r.index not in seen]
        order = torch.tensor(local, dtype=torch.int64, device=self._records[0].bucket.buffer.device)
        self._plan.broadcast_(order, what="broadcast of the bucket order")
        if self._plan.replicate is not None:  # replicas sum shards bucket by bucket, in this order too
            self._plan.replicate.broadcast_(order, what="broadcast of the bucket order across replicas")
        return order.tolist()

    # ---- buffers and launches ----------------------------------------------------------
    def _acquire(self, record: _Record) -> _CommBuffer:
        bucket = record.bucket
        if record.in_place:
            if record.shard_buffer is None:
                record.shard_buffer = _CommBuffer(bucket.grad_shard, owner=record.index)
            return record.shard_buffer
        while self._inflight and (len(self._inflight) >= self._max_inflight or self._inflight[0][1].done()):
            self._complete_oldest()  # a finished reduction's buffer is reused, not a new one allocated
        pool = self._pool.setdefault(record.comm_dtype, [])
        need = bucket.layout.padded_numel
        fits = [cb for cb in pool if cb.tensor.numel() >= need]
        if fits:
            cb = min(fits, key=lambda c: c.tensor.numel())
            pool.remove(cb)
        else:
            cb = _CommBuffer(torch.empty(need, dtype=record.comm_dtype, device=bucket.buffer.device))
        if cb.owner != record.index:
            for start, end in record.gaps:
                cb.tensor.narrow(0, start, end - start).zero_()
            cb.owner = record.index
        return cb

    def _copy_in(self, record: _Record, slot: int) -> None:
        bucket = record.bucket
        if record.buffer is None:
            record.buffer = self._acquire(record)
        p = bucket.params[slot]
        grad = raw_grad(p)
        if grad.is_sparse:
            raise RuntimeError(f"{bucket.buffer.names[slot]} has a sparse gradient; ShardedFusedAdam "
                               "needs dense gradients (e.g. nn.Embedding(sparse=False))")
        if grad.shape != p.shape or grad.dtype != p.dtype:
            raise RuntimeError(f"{bucket.buffer.names[slot]} has a gradient of shape {tuple(grad.shape)} and "
                               f"dtype {grad.dtype}; the param has shape {tuple(p.shape)} and dtype {p.dtype}")
        dst = record.buffer.slot_views(record.index, bucket)[slot]
        if record.in_place and bucket.grad_valid:
            dst.add_(grad)
        else:
            dst.copy_(grad)
        if record.predivide:
            dst.div_(self._averaging.divisor)
        self._averaging.collected(p)
        bucket.has_grad[slot] = True
        record.filled[slot] = True
        record.num_filled += 1

    def _launch(self, record: _Record) -> None:
        bucket = record.bucket
        for slot, p in enumerate(bucket.params):
            if raw_grad(p) is not None and not record.filled[slot]:
                self._copy_in(record, slot)
        cb = record.buffer or self._acquire(record)
        record.buffer = None
        record.launched = True
        flat = cb.tensor.narrow(0, 0, bucket.layout.padded_numel)
        if not (record.in_place and bucket.grad_valid):  # an accumulating shard keeps what absent params had
            views = cb.slot_views(record.index, bucket)
            for slot, filled in enumerate(record.filled):
                if not filled:
                    views[slot].zero_()
        if record.in_place:
            bucket.grad_valid = True
            return
        lend = not (bucket.grad_valid or record.lent) and bucket.grad_shard.dtype == flat.dtype
        record.lent |= lend  # the shard is empty until this reduction ends: the plan may write into it
        out = bucket.grad_shard if lend else (
            torch.empty_like(bucket.grad_shard, dtype=flat.dtype) if self._plan.reduce_needs_output else None)
        self._inflight.append((record, self._averaging.start(flat, out, f"gradients of bucket {record.index}"), cb))

    def _complete_oldest(self) -> None:
        record, pending, cb = self._inflight.popleft()
        summed = pending.wait()
        record.lent = False
        if self._plan.replicate is not None and self.reduces:  # hybrid: sum the shard across replicas
            self._plan.replicate.all_reduce(summed, f"gradient shard of bucket {record.index}").wait()
        bucket = record.bucket
        divisor = 1 if record.predivide else self._averaging.divisor
        if bucket.grad_valid:
            summed = summed.to(bucket.grad_shard.dtype)
            bucket.grad_shard.add_(summed.div_(divisor) if divisor > 1 else summed)
        else:
            bucket.grad_shard.copy_(summed)
            if divisor > 1:
                bucket.grad_shard.div_(divisor)
            bucket.grad_valid = True
        self._pool[cb.tensor.dtype].append(cb)

    # ---- step side -----------------------------------------------------------------------
    def finish(self) -> bool:
        """Reduce every pending gradient and wait: afterwards the shards hold the averages.

        A collective. After a backward the pending buckets were already started by its
        callback; otherwise (gradients set by hand, accumulated under ``no_sync()``, or
        averaged by DDP) the ranks first agree whether any of them holds a ``param.grad``.

        Returns:
            Whether any gradient shard changed.
        """
        if self.reduces:
            if self.phase is not GradPhase.BACKWARD:
                self._forget_touched()
        else:  # DDP's param.grad is the truth: take it afresh each step
            for record in self._records:
                record.bucket.grad_valid = False
                record.bucket.has_grad = [False] * len(record.bucket.has_grad)
        leftover = any(raw_grad(p) is not None for r in self._records for p in r.bucket.params)
        if self._reduced_since_finish:
            flush = leftover
        else:
            flush = self._plan.any_rank(leftover, self._records[0].bucket.buffer.device)
        if flush:
            self._flush()
        changed = flush or bool(self._inflight)
        while self._inflight:
            self._complete_oldest()
        self._release_pool()
        self._reduced_since_finish = False
        self._watch.warn_read_none()
        return changed

    def _release_pool(self) -> None:
        """Drop the comm buffers once every reduction of the step is done (see [Note: comm pool])."""
        if not self._records or self._records[0].bucket.buffer.device.type == "cpu":
            return
        self._pool.clear()
        self._plan.release_buffers()

    def end_step(self) -> None:
        """After ``step()``: watch for zeroing again (see [Note: watching param.grad])."""
        self.phase = GradPhase.STEPPED

    def _forget_touched(self) -> None:
        """Forget the gradient shards of params that other code zeroed or set since the step."""
        touched = self._watch.take_touched()
        if not touched:
            return
        for record in self._records:
            bucket = record.bucket
            hit = [slot for slot, p in enumerate(bucket.params) if id(p) in touched]
            if not hit or not (bucket.grad_valid or any(bucket.has_grad)):
                continue
            self._watch.forgotten({id(bucket.params[slot]) for slot in hit if bucket.has_grad[slot]})
            if len(hit) == len(bucket.params):
                bucket.grad_valid = False
                bucket.has_grad = [False] * len(bucket.has_grad)
                continue
            for frag in bucket.fragments:
                if frag.slot in hit and bucket.grad_valid:
                    bucket.grad_shard.narrow(0, frag.shard_offset, frag.numel).zero_()
            for slot in hit:
                bucket.has_grad[slot] = False

    def scale_(self, multiplier: float) -> None:
        """Scale the gradient shards (loss-scale removal and clipping, [Note: one scale])."""
        torch._foreach_mul_([r.bucket.grad_shard for r in self._records if r.bucket.grad_valid], multiplier)

    def clamp_(self, value: float) -> None:
        """Clamp the gradient shards elementwise (``clip_grad_value_``)."""
        for r in self._records:
            if r.bucket.grad_valid:
                r.bucket.grad_shard.clamp_(-value, value)

    def zero_grad(self, set_to_none: bool) -> None:
        """Forget (or zero) the gradient shards and any ``param.grad`` left on the params."""
        while self._inflight:
            self._complete_oldest()
        self._watch.take_touched()
        for record in self._records:
            bucket = record.bucket
            if set_to_none:
                bucket.grad_valid = False
                bucket.has_grad = [False] * len(bucket.has_grad)
            elif bucket.grad_valid:
                bucket.grad_shard.zero_()
            for p in bucket.params:
                grad = raw_grad(p)
                if grad is not None:
                    if set_to_none:
                        set_raw_grad(p, None)
                    else:
                        grad.detach_().zero_()

    def comm_buffer_bytes(self) -> int:
        """The pooled bucket buffers plus the plan's pooled receive buffers (send/recv reductions)."""
        pooled = sum(cb.tensor.numel() * cb.tensor.element_size() for pool in self._pool.values() for cb in pool)
        return pooled + self._plan.receive_buffer_bytes()

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        for record in self._records:
            record.expected = 0

"""Gradient path: backward hooks copy grads into bucket buffers and reduce them into shards.

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
rank's summed slice, divided by the world size, into its gradient shard; gradients set by
hand (``param.grad = ...``) or accumulated under ``no_sync()`` are collected there too.
Every rank must run the same number of backward passes per step, as with DDP.
"""
from __future__ import annotations

import contextlib
import weakref
from collections import deque
from typing import Iterator, NamedTuple, Sequence

import torch

from .bucket import LOW_PRECISION, Bucket
from .comm import CommPlan, Pending

__all__ = ["GradReducer"]


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


class _BucketPlan(NamedTuple):
    """Fixed per-bucket facts the hot path reads."""

    comm_dtype: torch.dtype
    in_place: bool  # one rank, same dtype: gradients land in the shard directly
    predivide: bool  # an fp16 sum over ranks can overflow where the average would not
    gaps: tuple[tuple[int, int], ...]


class _SumOverRanks:
    """Gradients are this rank's own: sum them over ranks, then divide by the world size."""

    hooks = True

    def __init__(self, plan: CommPlan):
        self.plan, self.divisor, self.needs_output = plan, plan.world_size, plan.reduce_needs_output

    def start(self, flat: torch.Tensor, out: torch.Tensor | None, what: str) -> Pending:
        return self.plan.reduce(flat, out, what)


class _AlreadyAveraged:
    """Gradients were averaged already (a DDP-wrapped model): keep this rank's slice, no comm.

    No hooks: DDP writes the averaged gradients into ``param.grad`` only when its backward
    ends, so they are collected at ``finish()``.
    """

    hooks = False
    divisor = 1
    needs_output = False

    def __init__(self, plan: CommPlan):
        self.plan = plan

    def start(self, flat: torch.Tensor, out: torch.Tensor | None, what: str) -> Pending:
        return Pending([], self.plan.own_shard(flat))


def _hook(reducer_ref: weakref.ref, param: torch.Tensor) -> None:
    reducer = reducer_ref()
    if reducer is not None:
        reducer.on_grad_ready(param)


class GradReducer:
    """Moves gradients from params into reduced shards (see [Note: gradient path]).

    Args:
        buckets: all buckets, in index order.
        plan: the collectives to use.
        reduce_dtype: dtype to communicate fp16/bf16 gradients in (fp32/fp64 grads travel as is).
        overlap: start each bucket's reduction during backward; False waits for its end.
        reduce: False when the gradients arrive averaged already (the model is wrapped in DDP).
        max_inflight: reductions in flight before a new buffer waits for the oldest. 4 measured
            faster than 2 on gloo (backward stalled in ``_acquire``) and no slower than 8; it
            bounds the buffer pool at 4 buckets.
    """

    def __init__(
        self,
        buckets: Sequence[Bucket],
        plan: CommPlan,
        *,
        reduce_dtype: torch.dtype,
        overlap: bool,
        reduce: bool = True,
        max_inflight: int = 4,
    ):
        self._buckets: list[Bucket] = []
        self._plan = plan
        self._reduce_dtype = reduce_dtype
        self._overlap = overlap
        self._averaging = _SumOverRanks(plan) if reduce else _AlreadyAveraged(plan)
        self._max_inflight = max_inflight
        self._where: dict[int, tuple[int, int]] = {}
        self._hooks: list = []
        self._hooked: set[int] = set()
        self._plans: list[_BucketPlan] = []
        self._in_place_buffers: dict[int, _CommBuffer] = {}
        self._expected: list[int] = []
        self._order: list[int] | None = None
        self._arrivals: list[int] = []
        self._inflight: deque[tuple[int, Pending, _CommBuffer | None]] = deque()
        self._pool: dict[torch.dtype, list[_CommBuffer]] = {}
        self._sync = True
        self._callback_queued = False
        self._reduced_since_finish = False
        self.add_buckets(buckets)

    # ---- construction -------------------------------------------------------------------
    def add_buckets(self, buckets: Sequence[Bucket]) -> None:
        """Take over more buckets (``add_param_group``); they join the end of the order."""
        ref = weakref.ref(self)
        for bucket in buckets:
            b = len(self._buckets)
            self._buckets.append(bucket)
            comm_dtype = self.comm_dtype(bucket)
            self._plans.append(_BucketPlan(
                comm_dtype, self._plan.world_size == 1 and comm_dtype == bucket.grad_shard.dtype,
                comm_dtype == torch.float16 and self._averaging.divisor > 1, bucket.layout.gaps()))
            hooked = 0
            for slot, p in enumerate(bucket.params):
                self._where[id(p)] = (b, slot)
                if p.requires_grad and self._averaging.hooks:
                    self._hooks.append(p.register_post_accumulate_grad_hook(lambda t, r=ref: _hook(r, t)))
                    self._hooked.add(id(p))
                    hooked += 1
            self._expected.append(hooked)
            if self._order is not None:
                self._order.append(b)
        self._new_round()

    def _new_round(self) -> None:
        n = len(self._buckets)
        self._filled = [[False] * len(bk.layout.slots) for bk in self._buckets]
        self._num_filled = [0] * n
        self._launched = [False] * n
        self._fill_buffer: list[_CommBuffer | None] = [None] * n
        self._next = 0

    def comm_dtype(self, bucket: Bucket) -> torch.dtype:
        return self._reduce_dtype if bucket.buffer.dtype in LOW_PRECISION else bucket.buffer.dtype

    # ---- backward -----------------------------------------------------------------------
    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally in ``param.grad``; the next synced backward reduces them."""
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    def on_grad_ready(self, param: torch.Tensor) -> None:
        if not self._sync:
            return
        b, slot = self._where[id(param)]
        if not self._callback_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
            self._callback_queued = True
        if self._order is None:  # first backward: only learn the completion order
            self._num_filled[b] += 1
            if self._num_filled[b] == self._expected[b]:
                self._arrivals.append(b)
            return
        if self._launched[b] or self._filled[b][slot]:
            return  # collected at finish() instead
        self._copy_in(b, slot)
        if self._overlap and self._num_filled[b] == self._expected[b]:
            while self._next < len(self._order):
                nb = self._order[self._next]
                if self._num_filled[nb] < self._expected[nb]:
                    break
                self._launch(nb)
                self._next += 1

    def _end_of_backward(self) -> None:
        self._callback_queued = False
        self._flush()

    def _flush(self) -> None:
        if self._order is None:
            self._order = self._agree_on_order()
        for b in self._order[self._next:]:
            self._launch(b)
        self._new_round()
        self._reduced_since_finish = True

    def _agree_on_order(self) -> list[int]:
        n = len(self._buckets)
        seen = list(dict.fromkeys(self._arrivals))
        local = seen + [b for b in range(n) if b not in seen]
        order = torch.tensor(local, dtype=torch.int64, device=self._buckets[0].master.device)
        return self._plan.broadcast_(order, what="broadcast of the bucket order").tolist()

    # ---- buffers and launches ----------------------------------------------------------
    def _acquire(self, b: int) -> _CommBuffer:
        bucket, plan = self._buckets[b], self._plans[b]
        if plan.in_place:
            if b not in self._in_place_buffers:
                self._in_place_buffers[b] = _CommBuffer(bucket.grad_shard, owner=b)
            return self._in_place_buffers[b]
        while len(self._inflight) >= self._max_inflight:
            self._complete_oldest()
        dtype = plan.comm_dtype
        pool = self._pool.setdefault(dtype, [])
        need = bucket.layout.padded_numel
        fits = [cb for cb in pool if cb.tensor.numel() >= need]
        if fits:
            cb = min(fits, key=lambda c: c.tensor.numel())
            pool.remove(cb)
        else:
            cb = _CommBuffer(torch.empty(need, dtype=dtype, device=bucket.master.device))
        if cb.owner != b:
            for start, end in plan.gaps:
                cb.tensor.narrow(0, start, end - start).zero_()
            cb.owner = b
        return cb

    def _copy_in(self, b: int, slot: int) -> None:
        bucket = self._buckets[b]
        cb = self._fill_buffer[b]
        if cb is None:
            cb = self._fill_buffer[b] = self._acquire(b)
        p = bucket.params[slot]
        grad = p.grad
        if grad.is_sparse:
            raise RuntimeError(f"{bucket.buffer.names[slot]} has a sparse gradient; ShardedFusedAdam "
                               "needs dense gradients (e.g. nn.Embedding(sparse=False))")
        if grad.shape != p.shape or grad.dtype != p.dtype:
            raise RuntimeError(f"{bucket.buffer.names[slot]} has a gradient of shape {tuple(grad.shape)} and "
                               f"dtype {grad.dtype}; the param has shape {tuple(p.shape)} and dtype {p.dtype}")
        plan = self._plans[b]
        dst = cb.slot_views(b, bucket)[slot]
        if plan.in_place and bucket.grad_valid:
            dst.add_(grad)
        else:
            dst.copy_(grad)
        if plan.predivide:
            dst.div_(self._averaging.divisor)
        p.grad = None
        bucket.has_grad[slot] = True
        self._filled[b][slot] = True
        self._num_filled[b] += 1

    def _launch(self, b: int) -> None:
        bucket = self._buckets[b]
        for slot, p in enumerate(bucket.params):
            if p.grad is not None and not self._filled[b][slot]:
                self._copy_in(b, slot)
        cb = self._fill_buffer[b] or self._acquire(b)
        self._fill_buffer[b] = None
        self._launched[b] = True
        in_place = self._plans[b].in_place
        flat = cb.tensor.narrow(0, 0, bucket.layout.padded_numel)
        if not (in_place and bucket.grad_valid):  # an accumulating shard keeps what absent params had
            views = cb.slot_views(b, bucket)
            for slot, filled in enumerate(self._filled[b]):
                if not filled:
                    views[slot].zero_()
        if in_place:
            bucket.grad_valid = True
            return
        out = torch.empty_like(bucket.grad_shard, dtype=flat.dtype) if self._averaging.needs_output else None
        self._inflight.append((b, self._averaging.start(flat, out, f"gradients of bucket {b}"), cb))

    def _complete_oldest(self) -> None:
        b, pending, cb = self._inflight.popleft()
        summed = pending.wait()
        bucket = self._buckets[b]
        divisor = 1 if self._plans[b].predivide else self._averaging.divisor
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
        callback; otherwise (gradients set by hand, or accumulated under ``no_sync()``)
        the ranks first agree whether any of them holds a ``param.grad`` to reduce.

        Returns:
            Whether any gradient shard changed.
        """
        leftover = self._hook_new_trainables()
        device = self._buckets[0].master.device
        if self._reduced_since_finish:
            flush = leftover
        else:
            flush = self._plan.any_rank(leftover, device)
        if flush:
            self._flush()
        changed = flush or bool(self._inflight)
        while self._inflight:
            self._complete_oldest()
        self._reduced_since_finish = False
        return changed

    def _hook_new_trainables(self) -> bool:
        """Hook params that became trainable after construction; report any ``param.grad`` left."""
        leftover = False
        ref = weakref.ref(self)
        for b, bucket in enumerate(self._buckets):
            for p in bucket.params:
                if p.grad is not None:
                    leftover = True
                if p.requires_grad and self._averaging.hooks and id(p) not in self._hooked:
                    self._hooks.append(p.register_post_accumulate_grad_hook(lambda t, r=ref: _hook(r, t)))
                    self._hooked.add(id(p))
                    self._expected[b] += 1
        return leftover

    def zero_grad(self, set_to_none: bool) -> None:
        """Forget (or zero) the gradient shards and any ``param.grad`` left on the params."""
        while self._inflight:
            self._complete_oldest()
        for bucket in self._buckets:
            if set_to_none:
                bucket.grad_valid = False
                bucket.has_grad = [False] * len(bucket.has_grad)
            elif bucket.grad_valid:
                bucket.grad_shard.zero_()
            for p in bucket.params:
                if p.grad is not None:
                    if set_to_none:
                        p.grad = None
                    else:
                        p.grad.detach_().zero_()

    def comm_buffer_bytes(self) -> int:
        return sum(cb.tensor.numel() * cb.tensor.element_size() for pool in self._pool.values() for cb in pool)

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

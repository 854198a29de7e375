"""One bucket on one rank: the flat params plus this rank's gradient, master and moment shards.

[Note: master weights]
For fp32/fp64 params the rank's slice of the flat param buffer *is* the master: Adam
updates it in place and no copy exists (8 bytes of moments per element per shard). For
fp16/bf16 params the rank keeps an fp32 master shard, fp32 moments and an fp32 gradient
shard; after the update the master is rounded into the flat param shard, which is then
gathered. The fp32 master is the source of truth: editing low-precision params in place
after construction is overwritten by the next step unless ``load_state_dict`` or
``ShardedFusedAdam.refresh_masters()`` copies them in. With ``master_weights="split"`` a bf16
bucket's master is its param shard plus an int16 residual instead (2 bytes per element, bit
for bit the same master: see [Note: split masters] in compact_state.py); an in-place edit of
the params then edits the master too, with the old residual as its low bits (so where that
residual was a tie the next split may move the edited param by one bf16 ulp), until
``refresh_masters()`` clears the residual.

[Note: staged update]
The fused kernels take fp32 (or fp64) tensors of one dtype. When a shard's master is split or
its moments are stored in bf16 (``state_dtype``), the update runs chunk by chunk
(``CHUNK_NUMEL`` elements of the shard at a time): the chunk's master is rebuilt and its
moments are widened into fp32 scratch, the kernel runs on views of the scratch (and of the
gradient shard), and the results are split and rounded back. Chunk boundaries are multiples
of 16 elements, so every element stays in the same vector lane as in one kernel call over
the segment (see [Note: alignment] in layout.py) and a split master trains bit for bit like
a 4-byte one. Rebuilding then splitting an element the kernel did not touch gives it back
unchanged, so whole chunks are staged.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import torch

from ..kernels import same_dtype
from ..kernels.rule import ADAM, MASTER_KEY
from .compact_state import CHUNK_NUMEL, resolve_master_weights
from .flat_buffer import FlatParamBuffer
from .layout import BucketLayout, kernel_segments, plan_buckets
from .storage import OFFLOAD_CHUNK_NUMEL, Scratch, StateStorage

__all__ = ["Bucket", "LOW_PRECISION", "MOMENT_KEYS", "STATE_KEYS", "pack_buckets"]

LOW_PRECISION = (torch.float16, torch.bfloat16)
# Per-param state tensors a checkpoint holds: the update rule's, plus our fp32 master.
STATE_KEYS = ADAM.checkpoint_keys
MOMENT_KEYS = ADAM.state_keys


class SegmentViews(NamedTuple):
    """The state shards cut into kernel segments: one list of views per tensor."""

    master: list[torch.Tensor]
    grad: list[torch.Tensor]
    exp_avg: list[torch.Tensor]
    exp_avg_sq: list[torch.Tensor]
    max_exp_avg_sq: list[torch.Tensor]


class _Chunk(NamedTuple):
    """One chunk of a staged update (see [Note: staged update])."""

    segments: tuple[int, ...]      # indices into the update's segment list that run in this chunk
    views: SegmentViews            # what the kernel gets: scratch views where staged
    actions: tuple[tuple[Callable[[], object], Callable[[], object]], ...]  # (stage, unstage) per staged tensor


class Bucket:
    """Everything this rank keeps for one bucket (see [Note: master weights]).

    Args:
        layout: the bucket's layout (shared by all ranks).
        params: the bucket's params in slot order; they become views into ``buffer.flat``.
        names: display names of the params, for error messages.
        group_index: the param group all of this bucket's params belong to.
        rank: this rank's index in the process group.
        master_weights: ``"fp32"`` or ``"split"`` (bf16 params only; see [Note: split masters]).
        state_dtype: the dtype the moments are stored in (None: fp32, or the dtype of
            fp64 params); the update always runs in fp32 (see [Note: staged update]).
        offload: None or ``"host"`` (see [Note: host offload] in storage.py).
        scratch: the staging scratch to share with other buckets (None: one of its own).
        reads_in_place: the kernel's ``reads_in_place`` (see kernels/__init__.py).
    """

    def __init__(self, layout: BucketLayout, params: Sequence[torch.Tensor], names: Sequence[str],
                 group_index: int, rank: int, *, master_weights: str = "fp32",
                 state_dtype: Optional[torch.dtype] = None, offload: Optional[str] = None,
                 scratch: Optional[Scratch] = None,
                 reads_in_place: Callable[[torch.dtype, torch.dtype], bool] = same_dtype):
        self.layout = layout
        self.group_index = group_index
        self.rank = rank
        self.buffer = FlatParamBuffer(layout, params, names)
        self.fragments = layout.fragments(rank)
        self.full_segments = tuple(
            (start, end) for start, end, _ in kernel_segments(self.fragments, layout.slots, [0] * len(self.fragments))
        )
        param_shard = self.buffer.shard(rank)
        assert master_weights == "fp32" or self.buffer.dtype == torch.bfloat16, (master_weights, self.buffer.dtype)
        self.storage = StateStorage(param_shard, master_weights=master_weights, state_dtype=state_dtype,
                                    offload=offload, chunk_numel=OFFLOAD_CHUNK_NUMEL if offload else CHUNK_NUMEL,
                                    scratch=scratch, reads_in_place=reads_in_place)
        self.compute_dtype = self.storage.compute_dtype
        self.state_dtype = self.storage.state_dtype
        self.chunk_numel = self.storage.chunk_numel
        self._num_buffers = 2 if offload else 1  # double buffered: chunk k + 1 stages while chunk k runs
        self.grad_shard = torch.zeros(param_shard.numel(), dtype=self.compute_dtype, device=param_shard.device)
        self.grad_valid = False  # False: the shard holds no gradient since zero_grad
        self.has_grad = [False] * len(layout.slots)  # this rank, since zero_grad
        self.steps = [0] * len(layout.slots)  # Adam step count per param (same on all ranks)
        self._views: tuple = ((), None)  # (ranges, SegmentViews) of the last direct update
        self._chunks: tuple = ((), ())  # ((ranges, amsgrad, scratch generation), chunks) of the last staged update

    @property
    def params(self) -> list[torch.Tensor]:
        return self.buffer.params

    @property
    def is_low_precision(self) -> bool:
        """fp16/bf16 params: the master is not the param shard, and the gradient shard is fp32."""
        return self.buffer.dtype in LOW_PRECISION

    @property
    def is_staged(self) -> bool:
        """The update runs on scratch chunks (see [Note: staged update])."""
        return self.storage.is_staged

    def moment(self, key: str) -> Optional[torch.Tensor]:
        """This rank's shard of the update rule's state tensor ``key`` as stored (None: not held)."""
        held = self.storage.moments.get(key)
        return None if held is None else held.tensor

    @property
    def amsgrad(self) -> bool:
        """Whether the rule's optional state (``max_exp_avg_sq``) is held."""
        return all(key in self.storage.moments for key, _ in ADAM.optional_keys)

    @property
    def master(self) -> torch.Tensor:
        """This rank's master shard (the param shard for fp32/fp64 params; a new fp32 tensor when split)."""
        return self.storage.master.full()

    @property
    def master_nbytes(self) -> int:
        """Bytes held for the master beyond the params: 0, 2 (split) or 4 per element."""
        return self.storage.master.nbytes

    @property
    def num_down_ties(self) -> int:
        """Split masters only: elements kept in the tie list (see [Note: split masters])."""
        return self.storage.master.num_down_ties

    @property
    def moment_nbytes(self) -> int:
        return self.storage.nbytes[1]

    @property
    def host_nbytes(self) -> int:
        """Bytes of master and moments held in host memory (offloaded)."""
        return self.storage.nbytes[2]

    @property
    def staging_nbytes(self) -> int:
        return self.storage.scratch.nbytes

    def adopt_grad_shard(self, view: torch.Tensor) -> None:
        """Use ``view`` (a shard of a replicated gradient buffer) as the gradient shard: no copy."""
        assert view.shape == self.grad_shard.shape and view.dtype == self.grad_shard.dtype
        self.grad_shard = view
        self._views, self._chunks = ((), None), ((), ())

    def ensure_amsgrad_buffer(self) -> None:
        self.storage.add_amsgrad()

    def segments_to_update(self, mask: Sequence[bool]) -> list[tuple[int, int, int]]:
        """``(start, end, new_step)`` shard ranges to update, given which params have a gradient.

        Params without a gradient on any rank are skipped and keep their step count
        (torch semantics); params with different step counts go to different calls.
        """
        steps = self.steps
        if all(mask) and steps.count(steps[0]) == len(steps):
            return [(start, end, steps[0] + 1) for start, end in self.full_segments]
        frags = [f for f in self.fragments if mask[f.slot]]
        return [
            (start, end, step + 1)
            for start, end, step in kernel_segments(frags, self.layout.slots, [steps[f.slot] for f in frags])
        ]

    def segment_views(self, ranges: tuple[tuple[int, int], ...]) -> SegmentViews:
        """Views of the state shards cut at ``ranges``, reused while the ranges stay the same
        (cutting thousands of views every step costs more than the update of ragged models).
        Only for buckets that are not staged."""
        assert not self.is_staged
        cached_ranges, views = self._views
        amsgrad = self.amsgrad
        if views is None or cached_ranges != ranges or bool(views.max_exp_avg_sq) != amsgrad:
            def cut(t: torch.Tensor | None) -> list[torch.Tensor]:
                return [] if t is None else [t.narrow(0, s, e - s) for s, e in ranges]
            # the rule's state keys come in the order of the kernel's state arguments (kernels/rule.py)
            views = SegmentViews(cut(self.storage.master.tensor), cut(self.grad_shard),
                                 *(cut(self.moment(key)) for key in ADAM.state_keys))
            self._views = (ranges, views)
        return views

    def update(self, segments: Sequence[tuple[int, int, int]], adam_step: Callable[..., None], *,
               amsgrad: bool, **scalars: Any) -> None:
        """Run a kernel's ``adam_step`` (see kernels/__init__.py) with ``scalars`` over ``segments``
        (from ``segments_to_update``) of the shards, staged if need be (see [Note: staged update])."""
        ranges = tuple((start, end) for start, end, _ in segments)
        steps = [step for _, _, step in segments]
        if not self.is_staged:
            v = self.segment_views(ranges)
            adam_step(v.master, v.grad, v.exp_avg, v.exp_avg_sq, v.max_exp_avg_sq if amsgrad else [], steps,
                      amsgrad=amsgrad, **scalars)
            return
        for chunk in self._chunk_plan(ranges, amsgrad):
            for stage, _ in chunk.actions:
                stage()
            v = chunk.views
            adam_step(v.master, v.grad, v.exp_avg, v.exp_avg_sq, v.max_exp_avg_sq, [steps[i] for i in chunk.segments],
                      amsgrad=amsgrad, **scalars)
            for _, unstage in chunk.actions:
                unstage()
        self.storage.finish()

    def _chunk_plan(self, ranges: tuple[tuple[int, int], ...], amsgrad: bool) -> tuple[_Chunk, ...]:
        """The chunks that ``ranges`` touch, with the kernel's views (cached like ``segment_views``)."""
        key = (ranges, amsgrad, self.storage.scratch.generation)
        if self._chunks[1] and self._chunks[0] == key:
            return self._chunks[1]
        held = self.storage.held(amsgrad)
        num_staged = sum(not h.in_place for h in held)
        numel = self.grad_shard.numel()
        size = self.chunk_numel
        num_chunks = -(-numel // size)
        buffers = min(self._num_buffers, num_chunks)  # one chunk needs no second buffer
        rows = self.storage.scratch.rows(num_staged * buffers, min(size, numel))
        plan = []
        for k in range(num_chunks):
            lo, hi = k * size, min((k + 1) * size, numel)
            pieces = [(i, max(s, lo), min(e, hi)) for i, (s, e) in enumerate(ranges) if s < hi and e > lo]
            if pieces:
                first = (k % buffers) * num_staged
                plan.append(self._make_chunk(k, lo, hi, pieces, held, rows[first:first + num_staged]))
        self._chunks = ((ranges, amsgrad, self.storage.scratch.generation), tuple(plan))
        return self._chunks[1]

    def _make_chunk(self, k: int, lo: int, hi: int, pieces: list[tuple[int, int, int]],
                    held: list, rows: list[torch.Tensor]) -> _Chunk:
        def cut(t: torch.Tensor, offset: int) -> list[torch.Tensor]:
            return [t.narrow(0, s - offset, e - s) for _, s, e in pieces]

        kernel, actions, free = [], [], iter(rows)
        for h in held:
            if h.in_place:
                kernel.append(cut(h.tensor, 0))
            else:
                row = next(free)
                kernel.append(cut(row, lo))
                actions.append(h.bind(k, lo, hi, row))
        master, *moments = kernel
        views = SegmentViews(master, cut(self.grad_shard, 0), *moments,
                             *([[]] if len(moments) == 2 else []))  # no amsgrad: no max_exp_avg_sq views
        return _Chunk(tuple(i for i, _, _ in pieces), views, tuple(actions))

    def advance_steps(self, mask: Sequence[bool]) -> None:
        self.steps = [s + 1 if m else s for s, m in zip(self.steps, mask)]

    def publish_master(self) -> None:
        """Round the fp32 master into this rank's slice of the flat params (a split master already did)."""
        self.storage.master.publish(self.buffer.shard(self.rank))

    def refresh_master(self) -> None:
        """Make the master equal the current low-precision params (after editing them in place)."""
        self.storage.master.refresh(self.buffer.shard(self.rank))

    # ---- checkpoint seam: the only writer of moments and masters besides the kernel ----
    def state_shards(self) -> dict[str, torch.Tensor]:
        """This rank's state shards by ``STATE_KEYS`` name (amsgrad and master only if held).

        Moments come in their stored dtype (``state_dtype``); the master always in fp32
        (rebuilt into a new tensor when split), so checkpoints reshard and interoperate.
        """
        shards = {key: held.full() for key, held in self.storage.moments.items()}
        if self.storage.master.checkpointed:
            shards[MASTER_KEY] = self.master
        return shards

    def state_template(self, key: str) -> torch.Tensor:
        """A meta tensor with the shape and the dtype a loader should stage ``key`` in (full precision)."""
        assert key in STATE_KEYS, key
        dtype = torch.float32 if key == MASTER_KEY else self.compute_dtype
        return torch.empty(self.grad_shard.shape, dtype=dtype, device="meta")

    def load_state(self, steps: Sequence[int], shards: Mapping[str, torch.Tensor]) -> None:
        """Replace the steps and state shards with loaded ones (shard-shaped, any device and dtype).

        Values are converted to the stored dtype (so moments saved in fp32 load into bf16
        moments and back). A moment missing from ``shards`` becomes zeros; a missing fp32
        master starts from the current low-precision params (see [Note: master weights]).
        """
        assert len(steps) == len(self.layout.slots), (len(steps), len(self.layout.slots))
        self.steps = [int(s) for s in steps]
        if any(key in shards for key, _ in ADAM.optional_keys):
            self.ensure_amsgrad_buffer()
        for key, held in self.storage.moments.items():
            held.load(shards.get(key))
        if self.storage.master.checkpointed:
            value = shards.get(MASTER_KEY)
            if value is None:
                self.refresh_master()
            else:
                self.storage.master.load(value)


def pack_buckets(params: Sequence[torch.Tensor], members: Sequence[int], names: Sequence[str], *,
                 group_index: int, first_index: int, world_size: int, rank: int,
                 bucket_cap_mb: float, master_weights: str = "auto",
                 state_dtype: Optional[torch.dtype] = None, offload: Optional[str] = None,
                 reads_in_place: Callable[[torch.dtype, torch.dtype], bool] = same_dtype) -> list[Bucket]:
    """Buckets for ``params[i] for i in members`` of one group: per dtype, in reverse order
    (the order backward produces gradients), at most ``bucket_cap_mb`` each. Offloaded buckets
    of one compute dtype share one staging scratch (see [Note: host offload] in storage.py)."""
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i in members:
        by_dtype.setdefault(params[i].dtype, []).append(i)
    buckets = []
    shared: dict[torch.dtype, Scratch] = {}
    for dtype, indices in by_dtype.items():
        cap = max(1, int(bucket_cap_mb * 2**20) // torch.empty((), dtype=dtype).element_size())
        order = [(first_index + i, params[i].numel()) for i in reversed(indices)]
        master = resolve_master_weights(master_weights, dtype, [names[i] for i in indices])
        compute = torch.float32 if dtype in LOW_PRECISION else dtype
        for layout in plan_buckets(order, world_size=world_size, bucket_numel=cap):
            local = [s.index - first_index for s in layout.slots]
            scratch = shared.setdefault(compute, Scratch(compute, params[local[0]].device)) if offload else None
            buckets.append(Bucket(layout, [params[i] for i in local], [names[i] for i in local], group_index, rank,
                                  master_weights=master, state_dtype=state_dtype, offload=offload, scratch=scratch,
                                  reads_in_place=reads_in_place))
    return buckets

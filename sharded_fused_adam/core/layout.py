"""Pure shard math: which bucket holds each param, where, and which piece each rank owns.

Nothing here touches tensors or torch.distributed; every function is a plain computation
on element counts, so it is tested exhaustively without a process group.

[Note: alignment]
Every param starts at a multiple of ``ALIGN_NUMEL`` elements inside its bucket and every
shard is a multiple of ``ALIGN_NUMEL`` long. Two reasons:
1. Aligned data pointers (64 bytes for fp32 masters, 32 for bf16/fp16 params) suit the
   vector units, the NPU's 32-byte rule and NCCL/HCCL.
2. Bitwise parity with ``torch.optim.Adam(fused=True)``: torch's CPU fused kernel runs a
   vector loop over each tensor and a scalar loop (which rounds differently) over its last
   ``numel % 8`` (AVX2) or ``numel % 16`` (AVX-512) elements. With aligned starts, an
   element's position modulo the vector width is the same in our flat shard as in its own
   param, and ``kernel_segments`` ends a kernel call after every "ragged" param (numel not a
   multiple of ``ALIGN_NUMEL``), so every element takes the same path as in torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

__all__ = [
    "ALIGN_NUMEL",
    "ParamSlot",
    "Fragment",
    "BucketLayout",
    "plan_buckets",
    "kernel_segments",
]

ALIGN_NUMEL = 16


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class ParamSlot:
    """One param's place in a bucket: global param ``index``, ``offset`` and ``numel`` in elements."""

    index: int
    offset: int
    numel: int

    @property
    def end(self) -> int:
        return self.offset + self.numel


@dataclass(frozen=True)
class Fragment:
    """The part ``[param_start, param_end)`` of param ``index`` that lies in one rank's shard.

    ``shard_offset`` is where that part starts inside the shard; ``slot`` is the param's
    position in ``BucketLayout.slots``.
    """

    slot: int
    index: int
    param_start: int
    param_end: int
    shard_offset: int

    @property
    def numel(self) -> int:
        return self.param_end - self.param_start


@dataclass(frozen=True)
class BucketLayout:
    """Params packed back to back (aligned) in one flat buffer split into equal shards."""

    slots: tuple[ParamSlot, ...]
    world_size: int
    shard_numel: int

    def __post_init__(self) -> None:
        assert self.shard_numel % ALIGN_NUMEL == 0, self.shard_numel
        assert self.padded_numel >= self.used_numel, (self.padded_numel, self.used_numel)

    @property
    def used_numel(self) -> int:
        """Elements up to the end of the last param (alignment gaps included)."""
        return self.slots[-1].end if self.slots else 0

    @property
    def padded_numel(self) -> int:
        return self.shard_numel * self.world_size

    @property
    def param_numel(self) -> int:
        return sum(s.numel for s in self.slots)

    def shard_range(self, rank: int) -> tuple[int, int]:
        """``[start, end)`` of ``rank``'s shard inside the flat buffer."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {rank}")
        return rank * self.shard_numel, (rank + 1) * self.shard_numel

    def fragments(self, rank: int) -> tuple[Fragment, ...]:
        """The param pieces inside ``rank``'s shard, in buffer order."""
        lo, hi = self.shard_range(rank)
        out = []
        for pos, s in enumerate(self.slots):
            start, end = max(s.offset, lo), min(s.end, hi)
            if start < end:
                out.append(Fragment(pos, s.index, start - s.offset, end - s.offset, start - lo))
        return tuple(out)

    def gaps(self) -> tuple[tuple[int, int], ...]:
        """``[start, end)`` ranges of the buffer that belong to no param (alignment and tail padding)."""
        out, cursor = [], 0
        for s in self.slots:
            if s.offset > cursor:
                out.append((cursor, s.offset))
            cursor = s.end
        if cursor < self.padded_numel:
            out.append((cursor, self.padded_numel))
        return tuple(out)


def _pack(items: Sequence[tuple[int, int]], world_size: int) -> BucketLayout:
    slots, cursor = [], 0
    for index, numel in items:
        slots.append(ParamSlot(index, cursor, numel))
        cursor = _round_up(cursor + numel, ALIGN_NUMEL)
    used = slots[-1].end
    shard = _round_up(-(-used // world_size), ALIGN_NUMEL)
    return BucketLayout(tuple(slots), world_size, shard)


def plan_buckets(
    params: Iterable[tuple[int, int]], *, world_size: int, bucket_numel: int
) -> list[BucketLayout]:
    """Pack ``(index, numel)`` params, in the given order, into buckets of at most ``bucket_numel``.

    A param larger than ``bucket_numel`` gets a bucket of its own; params are never split
    between buckets (a bucket is reduced when its last gradient arrives).

    Args:
        params: ``(global param index, numel)`` in packing order (backward order, usually).
        world_size: number of ranks sharing each bucket.
        bucket_numel: soft cap on the elements per bucket (alignment padding included).

    Returns:
        The buckets, in packing order.

    Raises:
        ValueError: ``world_size`` or ``bucket_numel`` below 1, or a param with numel 0 or less.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if bucket_numel < 1:
        raise ValueError(f"bucket_numel must be >= 1, got {bucket_numel}")
    buckets: list[BucketLayout] = []
    current: list[tuple[int, int]] = []
    current_numel = 0
    for index, numel in params:
        if numel < 1:
            raise ValueError(f"param {index} has numel {numel}; empty params cannot be sharded")
        aligned = _round_up(numel, ALIGN_NUMEL)
        if current and current_numel + aligned > bucket_numel:
            buckets.append(_pack(current, world_size))
            current, current_numel = [], 0
        current.append((index, numel))
        current_numel += aligned
    if current:
        buckets.append(_pack(current, world_size))
    return buckets


def kernel_segments(
    fragments: Sequence[Fragment], slots: Sequence[ParamSlot], keys: Sequence[object]
) -> tuple[tuple[int, int, object], ...]:
    """Group fragments into ``(start, end, key)`` shard ranges, one fused-kernel call each.

    A range covers fragments of consecutive slots with equal ``keys`` (the caller's per
    fragment step count, say) and the alignment gaps between them, which hold zeros and stay
    zero under Adam. A range also ends after a fragment that reaches the end of a ragged
    param, so that param's tail is a tensor tail exactly as in torch (see
    [Note: alignment]). ``fragments`` may be a filtered subset (params without a gradient
    left out); a skipped slot always ends the range. In the common case (every param numel a
    multiple of ``ALIGN_NUMEL``, one step count, all present) the result is a single range.
    """
    assert len(fragments) == len(keys), (len(fragments), len(keys))
    segments: list[tuple[int, int, object]] = []
    start = prev = None
    for frag, key in zip(fragments, keys):
        if prev is not None and (frag.slot != prev[0].slot + 1 or key != prev[1]):
            segments.append((start, prev[0].shard_offset + prev[0].numel, prev[1]))
            start = None
        if start is None:
            start = frag.shard_offset
        prev = (frag, key)
        slot = slots[frag.slot]
        if frag.param_end == slot.numel and slot.numel % ALIGN_NUMEL:
            segments.append((start, frag.shard_offset + frag.numel, key))
            start = prev = None
    if prev is not None:
        segments.append((start, prev[0].shard_offset + prev[0].numel, prev[1]))
    return tuple(segments)

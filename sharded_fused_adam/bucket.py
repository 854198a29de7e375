"""One bucket on one rank: the flat params plus this rank's gradient, master and moment shards.

[Note: master weights]
For fp32/fp64 params the rank's slice of the flat param buffer *is* the master: Adam
updates it in place and no copy exists (8 bytes of moments per element per shard). For
fp16/bf16 params the rank keeps an fp32 master shard, fp32 moments and an fp32 gradient
shard; after the update the master is rounded into the flat param shard, which is then
gathered. The fp32 master is the source of truth: editing low-precision params in place
after construction is overwritten by the next step unless ``load_state_dict`` or
``ShardedFusedAdam.refresh_masters()`` copies them in.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import torch

from .flat_buffer import FlatParamBuffer
from .layout import BucketLayout, kernel_segments

__all__ = ["Bucket", "LOW_PRECISION", "STATE_KEYS"]

LOW_PRECISION = (torch.float16, torch.bfloat16)
# Per-param state tensors a checkpoint holds, in torch.optim.Adam's names (plus our fp32 master).
STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master_param")


class SegmentViews(NamedTuple):
    """The state shards cut into kernel segments: one list of views per tensor."""

    master: list[torch.Tensor]
    grad: list[torch.Tensor]
    exp_avg: list[torch.Tensor]
    exp_avg_sq: list[torch.Tensor]
    max_exp_avg_sq: list[torch.Tensor]


class Bucket:
    """Everything this rank keeps for one bucket (see [Note: master weights]).

    Args:
        layout: the bucket's layout (shared by all ranks).
        params: the bucket's params in slot order; they become views into ``buffer.flat``.
        names: display names of the params, for error messages.
        group_index: the param group all of this bucket's params belong to.
        rank: this rank's index in the process group.
    """

    def __init__(
        self,
        layout: BucketLayout,
        params: Sequence[torch.Tensor],
        names: Sequence[str],
        group_index: int,
        rank: int,
    ):
        self.layout = layout
        self.group_index = group_index
        self.rank = rank
        self.buffer = FlatParamBuffer(layout, params, names)
        self.fragments = layout.fragments(rank)
        self.full_segments = tuple(
            (start, end) for start, end, _ in kernel_segments(self.fragments, layout.slots, [0] * len(self.fragments))
        )
        param_shard = self.buffer.shard(rank)
        low = self.buffer.dtype in LOW_PRECISION
        self.master = param_shard.float() if low else param_shard
        self.exp_avg = torch.zeros_like(self.master)
        self.exp_avg_sq = torch.zeros_like(self.master)
        self.max_exp_avg_sq: torch.Tensor | None = None
        self.grad_shard = torch.zeros_like(self.master)
        self.grad_valid = False  # False: the shard holds no gradient since zero_grad
        self.has_grad = [False] * len(layout.slots)  # this rank, since zero_grad
        self.steps = [0] * len(layout.slots)  # Adam step count per param (same on all ranks)
        self._views: tuple = ((), None)  # (ranges, SegmentViews) of the last update

    @property
    def params(self) -> list[torch.Tensor]:
        return self.buffer.params

    @property
    def is_low_precision(self) -> bool:
        return self.master.data_ptr() != self.buffer.shard(self.rank).data_ptr()

    def adopt_grad_shard(self, view: torch.Tensor) -> None:
        """Use ``view`` (a shard of a replicated gradient buffer) as the gradient shard: no copy."""
        assert view.shape == self.grad_shard.shape and view.dtype == self.grad_shard.dtype
        self.grad_shard = view
        self._views = ((), None)

    def ensure_amsgrad_buffer(self) -> torch.Tensor:
        if self.max_exp_avg_sq is None:
            self.max_exp_avg_sq = torch.zeros_like(self.master)
        return self.max_exp_avg_sq

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
        (cutting thousands of views every step costs more than the update of ragged models)."""
        cached_ranges, views = self._views
        amsgrad = self.max_exp_avg_sq is not None
        if views is None or cached_ranges != ranges or bool(views.max_exp_avg_sq) != amsgrad:
            def cut(t: torch.Tensor | None) -> list[torch.Tensor]:
                return [] if t is None else [t.narrow(0, s, e - s) for s, e in ranges]
            views = SegmentViews(cut(self.master), cut(self.grad_shard), cut(self.exp_avg),
                                 cut(self.exp_avg_sq), cut(self.max_exp_avg_sq))
            self._views = (ranges, views)
        return views

    def advance_steps(self, mask: Sequence[bool]) -> None:
        self.steps = [s + 1 if m else s for s, m in zip(self.steps, mask)]

    def publish_master(self) -> None:
        """Round the fp32 master into this rank's slice of the flat params (low precision only)."""
        if self.is_low_precision:
            self.buffer.shard(self.rank).copy_(self.master)

    # ---- checkpoint seam: the only writer of moments and masters besides the kernel ----
    def state_shards(self) -> dict[str, torch.Tensor]:
        """This rank's state shards by ``STATE_KEYS`` name (amsgrad and master only if held)."""
        shards = {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}
        if self.max_exp_avg_sq is not None:
            shards["max_exp_avg_sq"] = self.max_exp_avg_sq
        if self.is_low_precision:
            shards["master_param"] = self.master
        return shards

    def load_state(self, steps: Sequence[int], shards: Mapping[str, torch.Tensor]) -> None:
        """Replace the steps and state shards with loaded ones (shard-shaped, any device).

        A moment missing from ``shards`` becomes zeros; a missing fp32 master starts from
        the current low-precision params (see [Note: master weights]).
        """
        assert len(steps) == len(self.layout.slots), (len(steps), len(self.layout.slots))
        self.steps = [int(s) for s in steps]
        if "max_exp_avg_sq" in shards:
            self.ensure_amsgrad_buffer()
        for key, target in self.state_shards().items():
            value = shards.get(key)
            if value is not None:
                target.copy_(value)
            elif key == "master_param":
                target.copy_(self.buffer.shard(self.rank))
            else:
                target.zero_()

"""One staged-load skeleton for every loader: stage each bucket's state on the CPU, then commit it at once.

[Note: staged load]
Every loader (``load_state_dict``, ``load_sharded``, ``convert.load_named``, ``load_dcp``)
reads a checkpoint into staging tensors first, checks everything, and only then commits:
the param groups are replaced and each bucket's ``load_state`` is called. An error before
the commit leaves the optimizer exactly as it was. Staging tensors live on the CPU in the
dtype the bucket loads that key in (``Bucket.state_template``: the compute dtype for
moments, fp32 for masters), whatever dtype the bucket stores it in, so a master is never
rounded through a bf16 moment's dtype and an fp64 param's moments are never rounded
through fp32. Which keys a bucket stages is decided here too: the update rule's state keys,
plus the fp32 master for fp16/bf16 buckets. A key that no param of a bucket had in the
checkpoint is dropped before the commit, so the bucket keeps its default for it
(``Bucket.load_state``: zeros, or a master rebuilt from the params).
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, NamedTuple, Optional, Sequence

import torch

from ..core.bucket import Bucket
from ..core.layout import Fragment
from ..kernels.rule import ADAM, MASTER_KEY
from .state_view import ShardState

__all__ = ["PieceReader", "StagedLoad", "StagedView", "staged_keys"]

# read(key, param index, start, end, out): fill ``out`` with elements [start, end) of that param's
# flattened saved ``key``; False if the checkpoint has no such tensor for that param.
PieceReader = Callable[[str, int, int, int, torch.Tensor], bool]


class StagedView(NamedTuple):
    """Where one fragment of one param's saved tensor goes: a view into a staging tensor."""

    bucket: Bucket
    fragment: Fragment
    key: str
    out: torch.Tensor


def staged_keys(bucket: Bucket) -> tuple[str, ...]:
    """The keys a loader stages for ``bucket`` (see [Note: staged load])."""
    return ADAM.state_keys + ((MASTER_KEY,) if bucket.is_low_precision else ())


class StagedLoad:
    """Zeroed CPU staging tensors for this rank's buckets, filled by a loader, then committed.

    Args:
        shards: the optimizer's shard state.
        keys: which keys to stage for a bucket (default: ``staged_keys``).
    """

    def __init__(self, shards: ShardState, keys: Callable[[Bucket], Iterable[str]] = staged_keys):
        self.shards = shards
        self.pieces: list[dict[str, torch.Tensor]] = []
        for bucket in shards.buckets:
            templates = {key: bucket.state_template(key) for key in keys(bucket)}
            self.pieces.append({key: torch.zeros(t.shape, dtype=t.dtype) for key, t in templates.items()})

    def views(self) -> Iterator[StagedView]:
        """Every (bucket, fragment, key) staging view, for loaders that fill them in one batch (DCP)."""
        for bucket, pieces in zip(self.shards.buckets, self.pieces):
            for key, staged in pieces.items():
                for frag in bucket.fragments:
                    yield StagedView(bucket, frag, key, staged.narrow(0, frag.shard_offset, frag.numel))

    def fill(self, read: PieceReader) -> None:
        """Fill every staging tensor fragment by fragment; drop the keys no param of a bucket had."""
        for bucket, pieces in zip(self.shards.buckets, self.pieces):
            for key in list(pieces):
                found = False
                for frag in bucket.fragments:
                    out = pieces[key].narrow(0, frag.shard_offset, frag.numel)
                    found |= read(key, frag.index, frag.param_start, frag.param_end, out)
                if not found:
                    del pieces[key]

    def commit(self, param_groups: list[dict], step_of: Callable[[int], int],
               loss_scaler: Optional[dict] = None) -> None:
        """Replace the param groups, then every bucket's steps and state (and the loss scaler's).

        ``step_of(param index)`` gives each param's saved step; all of them are read before
        anything changes.
        """
        steps: list[Sequence[int]] = [[int(step_of(s.index)) for s in b.layout.slots] for b in self.shards.buckets]
        self.shards.param_groups[:] = param_groups
        for bucket, bucket_steps, pieces in zip(self.shards.buckets, steps, self.pieces):
            bucket.load_state(bucket_steps, pieces)
        if loss_scaler is not None:
            self.shards.loss_scaler.load_state_dict(loss_scaler)

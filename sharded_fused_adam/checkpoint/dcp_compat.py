"""``optimizer.state`` as torch's distributed-checkpoint API reads it.

[Note: optimizer.state is truthy once stepped]
The per-param state lives in the buckets, so the ``state`` dict that ``torch.optim.Optimizer``
keeps stays empty. ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` /
``set_optimizer_state_dict`` read an empty ``optimizer.state`` with no ``param.grad`` (after
backward ours are None: the averaged gradients are in the shards) as "never stepped" and
initialise it by calling ``step()`` with zero gradients and lr 0 (``_init_optim_state``):
on a trained optimizer that step would decay the moments and advance every step count.
``SteppedState`` is that dict, true as soon as any bucket has stepped, so the API calls
``state_dict()`` / ``load_state_dict()`` directly, as for a trained torch optimizer (on an
optimizer that never stepped it does what it does for torch's: one zero step).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

from ..core.bucket import Bucket

__all__ = ["SteppedState"]


class SteppedState(defaultdict):
    """``torch.optim.Optimizer.state`` (empty) that is true once any of ``buckets`` stepped."""

    def __init__(self, buckets: Sequence[Bucket]):
        super().__init__(dict)
        self._buckets = buckets

    def __bool__(self) -> bool:
        return len(self) > 0 or any(any(bucket.steps) for bucket in self._buckets)

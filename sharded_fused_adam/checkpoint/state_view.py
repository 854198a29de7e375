"""The public, read-only view of one rank's optimizer state that checkpoint code works on.

Checkpoint formats (``checkpoint.py``, ``sharded_checkpoint.py``, converters) never read the
optimizer's private attributes: they take a ``ShardState`` from
``ShardedFusedAdam.shard_state()`` and write moments and masters only through
``Bucket.load_state`` (see [Note: master weights] in bucket.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..core.bucket import Bucket
from ..comm.plans import CommPlan
from ..numerics.precision import LossScaler

__all__ = ["ShardState"]


@dataclass(frozen=True)
class ShardState:
    """What one rank holds: its buckets, the live param groups, the comm plan and the scaler.

    ``param_groups`` is the optimizer's own list: a loader replaces its contents (never the
    list) once everything it read was validated.
    """

    buckets: tuple[Bucket, ...]
    param_groups: list[dict[str, Any]]
    plan: CommPlan
    loss_scaler: LossScaler
    kernel_name: str
    device: torch.device

    @property
    def rank(self) -> int:
        return self.plan.rank

    @property
    def world_size(self) -> int:
        return self.plan.world_size

    @property
    def num_params(self) -> int:
        """Params across all groups (frozen and empty ones included: indices count them)."""
        return sum(len(g["params"]) for g in self.param_groups)

    def param_shapes(self) -> dict[int, torch.Size]:
        """Shape of every param by global index (the index torch's state dict uses)."""
        shapes, start = {}, 0
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                shapes[start + i] = p.shape
            start += len(group["params"])
        return shapes

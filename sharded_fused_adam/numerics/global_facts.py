"""The global facts of a step (overflow, gradient norm, which params have a gradient) and the clip factor.

The facts are agreed over every data-parallel rank and, with an ``mpu``, over the
model-parallel peers too (``CommPlan.all_reduce_stats``).

Under tensor parallelism every param that is not split (``tensor_model_parallel``) is a
copy on each tensor-parallel rank, so summing every rank's squares would count it once per
rank; as Megatron and DeepSpeed do, tensor-parallel rank 0 counts the copies and the other
ranks count only their split params (see [Note: topology] in comm/topology.py). The shard
ranges come from the layout's own kernel segments, so alignment gaps (zeros) may be
included and change nothing.

[Note: one host sync per step]
On a device every value the host reads costs a synchronisation. A step reads the combined
statistics once (``read_stats``); the non-finite flag each rank contributes is derived
from its norm piece on the device, never read alone. A sum of squares that overflowed over
finite elements sets that flag too, so where the combined flag is set (an overflowing step,
rare) every rank checks its elements and the ranks combine that answer in a second small
all-reduce: the verdict is exact, and ordinary steps read the host once.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import torch

from ..comm.plans import CommPlan
from ..core.bucket import Bucket
from ..core.layout import kernel_segments
from .precision import GradStats, any_non_finite, clip_coefficient, local_stats, read_stats

__all__ = ["norm_shards", "grad_stats", "clip_factor"]


def norm_shards(buckets: Sequence[Bucket], counts: Callable[[torch.Tensor], bool],
                everything: bool) -> list[torch.Tensor]:
    """The gradient-shard tensors whose norm this rank contributes.

    Args:
        buckets: the optimizer's buckets (those without a valid gradient shard are skipped).
        counts: whether this rank counts a param in the norm.
        everything: every param counts here (no model parallelism):
            the whole shards, exactly as before.

    Returns:
        Whole gradient shards, or views of the ranges of counted params.
    """
    valid = [b for b in buckets if b.grad_valid]
    if everything:
        return [b.grad_shard for b in valid]
    views = []
    for bucket in valid:
        keys = [counts(bucket.params[f.slot]) for f in bucket.fragments]
        for start, end, counted in kernel_segments(bucket.fragments, bucket.layout.slots, keys):
            if counted:
                views.append(bucket.grad_shard.narrow(0, start, end - start))
    return views


def grad_stats(buckets: Sequence[Bucket], plan: CommPlan, counts: Callable[[torch.Tensor], bool], everything: bool,
               norm_type: float, device: torch.device) -> GradStats:
    """The step's global gradient facts (a collective over the data- and model-parallel ranks).

    Args:
        buckets: the optimizer's buckets.
        plan: the shard group's plan (carrying the replicate and model-parallel plans).
        counts, everything: which params this rank counts in the norm (see ``norm_shards``).
        norm_type: the p of the p-norm (``inf`` allowed).
        device: where the statistics tensor lives.
    """
    flags = [flag for b in buckets for flag in b.has_grad]
    shards = norm_shards(buckets, counts, everything)
    stats = read_stats(plan.all_reduce_stats(local_stats(shards, flags, norm_type, device), norm_type), norm_type)
    if stats.found_inf:  # some rank's norm piece is not finite: an element, or only a sum that overflowed?
        flag = plan.all_reduce_stats(torch.cat([any_non_finite(shards, device), torch.zeros(1, device=device)]), 2.0)
        stats = dataclasses.replace(stats, found_inf=bool(flag[0].item() > 0))
    return stats


def clip_factor(pending: Sequence[tuple[float, float]], max_grad_norm: Optional[float],
                stats_of: Callable[[float], GradStats], loss_scale: float) -> float:
    """The smallest clip coefficient asked for: by ``clip_grad_norm_`` calls (``(max_norm, norm_type)``
    pairs) and by ``max_grad_norm`` (the 2-norm; None: not asked); 1.0 if none clips."""
    coef = 1.0
    for max_norm, norm_type in pending:
        coef = min(coef, clip_coefficient(stats_of(norm_type).norm / loss_scale, max_norm))
    if max_grad_norm is not None:
        coef = min(coef, clip_coefficient(stats_of(2.0).norm / loss_scale, max_grad_norm))
    return coef

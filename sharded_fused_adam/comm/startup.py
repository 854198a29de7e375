"""Start-up agreement: a process group where one is expected, one layout on every rank, equal params.

[Note: start-up agreement]
Collectives only match if every rank built the same buckets, so at construction, before
any flat buffer exists, the ranks compare a digest of their params (count, group, shape,
dtype, trainability, in order) with one small all-reduce. Only if the digests differ do
they exchange the full descriptions (one object all-gather) so that every rank raises the
same ValueError naming the first differing param and the ranks that disagree: never an
abort inside the transport, never silent training on mismatched shards. Then rank 0's
params are broadcast to every rank, as DDP does, so ranks seeded differently still start
from one model.
"""
from __future__ import annotations

import hashlib
import os
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from .plans import CommPlan

__all__ = ["require_process_group", "describe_params", "agree_on_layout", "broadcast_params", "newly_trainable"]

ParamInfo = tuple[int, tuple[int, ...], str, bool]  # (group, shape, dtype, requires_grad)


def require_process_group(process_group: Optional[dist.ProcessGroup]) -> None:
    """Refuse to become a one-rank optimizer inside a multi-rank launch.

    Raises:
        RuntimeError: WORLD_SIZE > 1 in the environment but torch.distributed is not initialized.
    """
    if process_group is not None or (dist.is_available() and dist.is_initialized()):
        return
    world_size = os.environ.get("WORLD_SIZE", "1")
    if world_size.isdigit() and int(world_size) > 1:
        raise RuntimeError(
            f"WORLD_SIZE={world_size} but torch.distributed is not initialized: this rank would train "
            "alone and the ranks would diverge. Call launcher.init_distributed() (or "
            "torch.distributed.init_process_group) before building ShardedFusedAdam.")


def describe_params(param_groups: Sequence[dict[str, Any]]) -> list[ParamInfo]:
    """What must be equal on every rank, param by param, in order."""
    return [(gi, tuple(p.shape), str(p.dtype).removeprefix("torch."), bool(p.requires_grad))
            for gi, group in enumerate(param_groups) for p in group["params"]]


def _digest(infos: Sequence[ParamInfo]) -> int:
    return int.from_bytes(hashlib.sha256(repr(list(infos)).encode()).digest()[:7], "little")


def _first_difference(mine: Sequence[ParamInfo], theirs: Sequence[ParamInfo]) -> str:
    for i, (a, b) in enumerate(zip(mine, theirs)):
        if a != b:
            return (f"param {i}: group {a[0]} shape {a[1]} {a[2]} requires_grad={a[3]} here vs "
                    f"group {b[0]} shape {b[1]} {b[2]} requires_grad={b[3]} on rank 0")
    return f"{len(mine)} params here vs {len(theirs)} on rank 0"


def agree_on_layout(plan: CommPlan, infos: list[ParamInfo], device: torch.device) -> None:
    """Check that every rank describes the same params (see [Note: start-up agreement]).

    Raises:
        ValueError: on every rank, if any rank differs; it names the ranks and the first difference.
    """
    if plan.world_size == 1:
        return
    digest = _digest(infos)
    t = torch.tensor([digest, -digest], dtype=torch.int64, device=device)
    plan.all_reduce_(t, dist.ReduceOp.MAX, "all-reduce of the param layout digest")
    if t[0].item() == digest and -t[1].item() == digest:
        return
    everyone = plan.all_gather_object(infos, "all-gather of param layouts after a mismatch")
    differing = [r for r, other in enumerate(everyone) if other != everyone[0]]
    first = _first_difference(everyone[differing[0]], everyone[0])
    raise ValueError(
        f"the ranks built ShardedFusedAdam over different params: rank(s) {differing} differ from rank 0 "
        f"(first difference on rank {differing[0]}: {first}). Every rank must build the same model and "
        "pass its params in the same order, with the same requires_grad flags.")


@torch.no_grad()
def broadcast_params(plan: CommPlan, params: Sequence[torch.Tensor]) -> None:
    """Copy rank 0's values into every rank's params (before they are packed)."""
    if plan.world_size == 1:
        return
    for i, p in enumerate(params):
        if not p.numel():
            continue
        data = p.data if p.data.is_contiguous() else p.data.contiguous()
        plan.broadcast_(data, what=f"broadcast of param {i} from rank 0")
        if data is not p.data:
            p.data.copy_(data)


def newly_trainable(plan: CommPlan, idle: Sequence[torch.Tensor], param_groups: Sequence[dict[str, Any]],
                    device: torch.device) -> set[int]:
    """Ids of the bucket-less params that now require a gradient, agreed by every rank.

    A collective only when there are bucket-less (frozen) params. Raises ValueError on
    every rank if the ranks unfroze different params.
    """
    if not any(p.numel() for p in idle):
        return set()
    new = {id(p) for p in idle if p.requires_grad and p.numel() > 0}
    count = torch.tensor([len(new), -len(new)], dtype=torch.float32, device=device)
    plan.all_reduce_(count, dist.ReduceOp.MAX, "all-reduce of newly trainable params")
    if count[0].item() == 0:
        return set()
    if count[0].item() != -count[1].item():
        raise ValueError(f"ranks disagree on which frozen params became trainable (this rank: {len(new)}); "
                         "set requires_grad identically on every rank")
    agree_on_layout(plan, describe_params(param_groups), device)
    return new

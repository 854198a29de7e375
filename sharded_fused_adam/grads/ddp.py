"""Finding a DDP wrapper around the optimizer's params, and checking that it averages over the right ranks.

[Note: DDP over the right group]
DDP's group must be the optimizer's data-parallel ranks: a DDP over another group (say the
replicate group of a hybrid layout) averages over the wrong ranks, so it is an error that
names both groups (``check_ddp_group``).
"""
from __future__ import annotations

import gc
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from ..comm.plans import CommPlan

__all__ = ["find_ddp", "check_ddp_group"]


def find_ddp(params: Sequence[torch.Tensor]) -> Optional[torch.nn.Module]:
    """A live ``DistributedDataParallel`` module holding any of ``params`` (a gc scan, once), or None."""
    ddp_type = getattr(torch.nn.parallel, "DistributedDataParallel", None)
    if ddp_type is None:
        return None
    ours = {id(p) for p in params}
    for obj in gc.get_objects():
        # type(), not isinstance(): gc also holds dead weak proxies (torch.compile keeps some),
        # on which isinstance() raises ReferenceError.
        if issubclass(type(obj), ddp_type) and any(id(p) in ours for p in obj.module.parameters()):
            return obj
    return None


def _group_ranks(group: Any) -> list[int]:
    return dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)


def check_ddp_group(ddp: torch.nn.Module, plan: CommPlan) -> None:
    """A DDP wrapper must average over exactly the optimizer's data-parallel ranks ([Note: DDP over the right group]).

    Raises:
        ValueError: naming DDP's group, the optimizer's groups and the supported ways.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    theirs = _group_ranks(getattr(ddp, "process_group", None))
    shard = _group_ranks(plan.group)
    replicate = _group_ranks(plan.replicate.group) if plan.replicate is not None else []
    # Without the other replicas' groups (a collective) this is the check: same size, and it
    # holds this rank's shard group and replicate group.
    if len(theirs) == plan.divisor and set(shard) <= set(theirs) and set(replicate) <= set(theirs):
        return
    ours = f"shard group {shard}" + (f" x replicate group {replicate}" if replicate else "")
    raise ValueError(f"the model is wrapped in DistributedDataParallel over global ranks {theirs}, but "
                     f"ShardedFusedAdam averages gradients over its data-parallel ranks ({ours}, "
                     f"{plan.divisor} ranks): DDP would average over the wrong ranks. Drop the DDP wrapper (the "
                     "optimizer reduces the gradients itself; for hybrid sharding pass device_mesh=... with dims "
                     "('replicate', 'shard')), or build DDP over the same group as the optimizer")

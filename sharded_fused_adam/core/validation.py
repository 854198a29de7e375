"""Checks of the params a user passes, at construction: types, layouts, aliasing, one device.

Every failure names the argument (or the param), the rule and the value, and happens
before the optimizer touches any tensor, so a rejected call leaves the model untouched.

Hyperparameter checks belong to the update rule (kernels/rule.py).

[Note: aliased params]
Every param becomes a view into a flat buffer, which cannot hold the same memory twice, so
two params may not overlap in memory. The check compares the byte ranges the params span,
not their storages: params that are disjoint views of one storage are fine. That case is
common: after an optimizer is gone, its model's params are still views into its old flat
buffer, and a new optimizer over them must work (torch's optimizers allow it). A param that
a live optimizer still holds in its buckets is refused instead (``owner_of``), naming that
optimizer: building a second one would re-point the params and silently detach the first.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

__all__ = ["ParamRegistry", "check_params", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# [Note: DTensor params]
# A DTensor (FSDP2's ``fully_shard``, ``distribute_tensor``, tensor parallelism) holds only
# its local shard and has no storage of its own to view into a flat buffer; its gradient is
# a DTensor too. This optimizer shards plain params itself, so sharding twice has no
# meaning here: it refuses them at construction, naming the param and the ways that work.
_DTENSOR_HELP = (
    "ShardedFusedAdam shards plain (replicated) params itself and cannot take a param that is "
    "already sharded. Either build it on the model without fully_shard / distribute_tensor (it "
    "averages gradients over the data-parallel group and shards the optimizer state itself), or "
    "keep FSDP2 and use torch.optim.Adam/AdamW(fused=True), which FSDP2 supports")


def _reject_dtensor(p: torch.Tensor, name: str) -> None:
    if not torch.distributed.is_available():
        return
    from torch.distributed.tensor import DTensor  # imported here: torch.distributed may be absent

    if isinstance(p, DTensor):
        raise TypeError(f"{name} is a DTensor (placements {tuple(p.placements)} on a mesh of "
                        f"{p.device_mesh.size()} ranks, e.g. from FSDP2's fully_shard). {_DTENSOR_HELP}")


def _memory_span(p: torch.Tensor) -> tuple[int, int]:
    """``[first byte, last byte + 1)`` of the memory ``p``'s elements occupy (strides are >= 0)."""
    last = sum((size - 1) * stride for size, stride in zip(p.shape, p.stride()))
    start = p.data_ptr()
    return start, start + (last + 1) * p.element_size()


@dataclass
class ParamRegistry:
    """The params an optimizer accepted so far: by identity, their memory spans (sorted, disjoint)
    and their one device (see [Note: aliased params])."""

    by_id: dict[int, str] = field(default_factory=dict)
    spans: list[tuple[int, int, str]] = field(default_factory=list)
    device: Optional[torch.device] = None
    first_name: str = ""

    def __bool__(self) -> bool:
        return bool(self.by_id)

    def overlapping(self, span: tuple[int, int]) -> Optional[str]:
        """The name of a registered param whose memory overlaps ``span``, or None."""
        at = bisect.bisect_right(self.spans, (span[0], float("inf"), ""))
        before = self.spans[at - 1] if at else None
        after = self.spans[at] if at < len(self.spans) else None
        if before is not None and before[1] > span[0]:
            return before[2]
        if after is not None and after[0] < span[1]:
            return after[2]
        return None


def _live_owner_error(name: str, owner: Any) -> ValueError:
    held = sum(len(g["params"]) for g in owner.param_groups)
    return ValueError(f"{name} is already sharded by another live {type(owner).__name__} (object at {id(owner):#x}, "
                      f"{held} params in {len(owner.param_groups)} param groups): a param can belong to one live "
                      "ShardedFusedAdam at a time, because each makes its params views into its own flat buffer "
                      "and building this one would silently detach them from the first. Delete the first "
                      "(`del opt; gc.collect()`) before building this one, or put every param group into one "
                      "optimizer")


def check_params(params: Sequence[torch.Tensor], names: Sequence[str], registry: ParamRegistry,
                 owner_of: Optional[Callable[[torch.Tensor], Any]] = None) -> None:
    """Validate params against each other and against those already in ``registry``.

    ``registry`` is owned by the caller and grows with every accepted param; it is only
    updated once the whole sequence passed, so a rejected group leaves it unchanged.

    Args:
        params, names: the params of one group and their names for messages.
        registry: what the optimizer accepted so far.
        owner_of: returns the live optimizer that holds a param, or None (see
            [Note: aliased params]).

    Raises:
        TypeError: a param that is not a floating-point tensor of a supported dtype.
        ValueError: a non-leaf, sparse, duplicated or overlapping param, one a live
            optimizer holds, or params on different devices.
    """
    new = ParamRegistry(dict(registry.by_id), list(registry.spans), registry.device, registry.first_name)
    for p, name in zip(params, names):
        _reject_dtensor(p, name)
        if p.is_sparse or p.layout != torch.strided:
            raise ValueError(f"{name} has layout {p.layout}; only dense (strided) params can be sharded")
        if p.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {p.dtype}; ShardedFusedAdam supports "
                            f"{', '.join(str(d) for d in SUPPORTED_DTYPES)}")
        if not p.is_leaf:
            raise ValueError(f"{name} is not a leaf tensor (it was computed from other tensors); "
                             "pass the original parameters")
        if new.device is None:
            new.device, new.first_name = p.device, name
        elif p.device != new.device:
            raise ValueError(f"all params must be on one device (one device per rank), got "
                             f"{new.device} ({new.first_name}) and {p.device} ({name})")
        other, what = new.by_id.get(id(p)), "is the same tensor as"
        span = _memory_span(p)
        if other is None and p.numel():  # empty tensors own no memory (their data pointers may coincide)
            other, what = new.overlapping(span), "overlaps the memory range of"
        if other is not None:
            raise ValueError(f"{name} {what} {other}: each param may appear only once across all param "
                             "groups, and params may not overlap in memory, because every param becomes a "
                             "view into one flat buffer, which cannot hold the same memory twice "
                             "(torch.optim.Adam only warns about a duplicate)")
        owner = owner_of(p) if owner_of is not None else None
        if owner is not None:
            raise _live_owner_error(name, owner)
        new.by_id[id(p)] = name
        if p.numel():
            bisect.insort(new.spans, (*span, name))
    registry.by_id, registry.spans = new.by_id, new.spans
    registry.device, registry.first_name = new.device, new.first_name

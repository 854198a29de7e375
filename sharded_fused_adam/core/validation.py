"""Checks of the params a user passes, at construction: types, layouts, aliasing, one device.

Every failure names the argument (or the param), the rule and the value, and happens
before the optimizer touches any tensor, so a rejected call leaves the model untouched.

Hyperparameter checks belong to the update rule (kernels/rule.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

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


@dataclass
class ParamRegistry:
    """The params an optimizer accepted so far: by identity, by storage, and their one device."""

    by_id: dict[int, str] = field(default_factory=dict)
    by_storage: dict[int, str] = field(default_factory=dict)
    device: Optional[torch.device] = None
    first_name: str = ""

    def __bool__(self) -> bool:
        return bool(self.by_id)


def check_params(params: Sequence[torch.Tensor], names: Sequence[str], registry: ParamRegistry) -> None:
    """Validate params against each other and against those already in ``registry``.

    ``registry`` is owned by the caller and grows with every accepted param; it is only
    updated once the whole sequence passed, so a rejected group leaves it unchanged.

    Raises:
        TypeError: a param that is not a floating-point tensor of a supported dtype, or a
            DTensor (see [Note: DTensor params]).
        ValueError: a non-leaf, sparse, duplicated or storage-sharing param, or params on
            different devices.
    """
    new = ParamRegistry(dict(registry.by_id), dict(registry.by_storage), registry.device, registry.first_name)
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
        checks = [(new.by_id, id(p), "is the same tensor as")]
        if p.numel():  # empty tensors own no memory to share (their data pointers may coincide)
            checks.append((new.by_storage, p.untyped_storage().data_ptr(), "shares storage with"))
        for table, key, what in checks:
            if key in table:
                raise ValueError(f"{name} {what} {table[key]}: each param may appear only once across "
                                 "all param groups, and params may not alias each other, because every "
                                 "param becomes a view into one flat buffer, which cannot hold the same "
                                 "memory twice (torch.optim.Adam only warns about a duplicate)")
            table[key] = name
        if new.device is None:
            new.device, new.first_name = p.device, name
        elif p.device != new.device:
            raise ValueError(f"all params must be on one device (one device per rank), got "
                             f"{new.device} ({new.first_name}) and {p.device} ({name})")
    registry.by_id, registry.by_storage = new.by_id, new.by_storage
    registry.device, registry.first_name = new.device, new.first_name

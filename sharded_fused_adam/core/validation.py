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
        TypeError: a param that is not a floating-point tensor of a supported dtype.
        ValueError: a non-leaf, sparse, duplicated or storage-sharing param, or params on
            different devices.
    """
    new = ParamRegistry(dict(registry.by_id), dict(registry.by_storage), registry.device, registry.first_name)
    for p, name in zip(params, names):
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

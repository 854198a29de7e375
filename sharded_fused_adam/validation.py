"""Checks of user input at construction: hyperparameters, params and param groups.

Every failure names the argument (or the param), the rule and the value, and happens
before the optimizer touches any tensor, so a rejected call leaves the model untouched.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Any, Sequence

import torch

__all__ = ["adam_defaults", "check_hyperparameters", "check_params", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _number(name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def adam_defaults(lr: Any, betas: Any, eps: Any, weight_decay: Any, amsgrad: Any, adamw: Any) -> dict:
    """The optimizer defaults dict (torch.optim.Adam's keys), validated."""
    defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                    decoupled_weight_decay=adamw)
    check_hyperparameters(defaults)
    return defaults


def check_hyperparameters(group: dict, where: str = "") -> None:
    """Validate one param group's Adam hyperparameters (torch's ranges).

    Raises:
        TypeError: a hyperparameter of the wrong type.
        ValueError: a value out of range or not finite.
    """
    suffix = f" ({where})" if where else ""
    lr = _number("lr", group["lr"])
    if lr < 0:
        raise ValueError(f"lr must be >= 0, got {lr}{suffix}")
    eps = _number("eps", group["eps"])
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}{suffix}")
    wd = _number("weight_decay", group["weight_decay"])
    if wd < 0:
        raise ValueError(f"weight_decay must be >= 0, got {wd}{suffix}")
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair of floats, got {betas!r}{suffix}")
    for i, beta in enumerate(betas):
        b = _number(f"betas[{i}]", beta)
        if not 0.0 <= b < 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {b}{suffix}")
    for flag in ("amsgrad", "decoupled_weight_decay"):
        if not isinstance(group[flag], bool):
            raise TypeError(f"{flag} must be a bool, got {type(group[flag]).__name__}{suffix}")


def check_params(params: Sequence[torch.Tensor], names: Sequence[str], taken: dict) -> None:
    """Validate params against each other and against those already in ``taken``.

    ``taken`` is owned by the caller and grows with every accepted param; it is only
    updated once the whole sequence passed, so a rejected group leaves it unchanged.

    Raises:
        TypeError: a param that is not a floating-point tensor of a supported dtype.
        ValueError: a non-leaf, sparse, empty, duplicated or storage-sharing param, or
            params on different devices.
    """
    new: dict = {}
    for p, name in zip(params, names):
        if p.is_sparse or p.layout != torch.strided:
            raise ValueError(f"{name} has layout {p.layout}; only dense (strided) params can be sharded")
        if p.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {p.dtype}; ShardedFusedAdam supports "
                            f"{', '.join(str(d) for d in SUPPORTED_DTYPES)}")
        if not p.is_leaf:
            raise ValueError(f"{name} is not a leaf tensor (it was computed from other tensors); "
                             "pass the original parameters")
        keys = [(("id", id(p)), "is the same tensor as")]
        if p.numel():  # empty tensors own no memory to share (their data pointers may coincide)
            keys.append((("storage", p.untyped_storage().data_ptr()), "shares storage with"))
        for key, what in keys:
            other = new.get(key) or taken.get(key)
            if other is not None:
                raise ValueError(f"{name} {what} {other}: each param may appear only once across "
                                 "all param groups, and params may not alias each other")
            new[key] = name
        device, first = new.get("device") or taken.get("device") or (p.device, name)
        if p.device != device:
            raise ValueError(f"all params must be on one device (one device per rank), got "
                             f"{device} ({first}) and {p.device} ({name})")
        new["device"] = (device, first)
    taken.update(new)

"""Drop-ins for ``torch.nn.utils.clip_grad_norm_`` / ``clip_grad_value_`` that reach the optimizer's shards.

With sharded gradients ``param.grad`` is None after backward (the averaged gradient lives in
the owning ``ShardedFusedAdam``), so torch's functions would clip nothing. These take the
same arguments, find the optimizer that owns the params and clip its averaged gradients
there; params that no ShardedFusedAdam owns (or one with ``grads="replicated"``, whose
``param.grad`` is real) go to torch's own function. An optimizer built with an ``mpu`` gets
its params back even with ``grads="replicated"``: torch's function would clip each
model-parallel rank by its own part of the norm, while the optimizer's norm spans them all
(the clip then applies at the next ``step()``, like the sharded one).
"""
from __future__ import annotations

import weakref
from typing import Any, Iterable, Union

import weakref

import torch

from ..grads.grad_watch import watch_of

__all__ = ["clip_grad_norm_", "clip_grad_value_", "holder_of", "link_owner", "owner_of"]

# id(param) -> (the param, weakly; its optimizer, weakly), for params no grad watch covers
_LINKS: dict[int, tuple[weakref.ref, weakref.ref]] = {}


def link_owner(params: Iterable[torch.Tensor], owner: Any) -> None:
    """Let ``holder_of`` find ``owner`` for ``params`` that no grad watch covers (replicated
    gradients); nothing is stored on the params, and the links die with them."""
    for p in params:
        key = id(p)

        def unlink(ref: weakref.ref, key: int = key) -> None:
            if _LINKS.get(key, (None,))[0] is ref:
                del _LINKS[key]
        _LINKS[key] = (weakref.ref(p, unlink), weakref.ref(owner))


def holder_of(p: torch.Tensor) -> Any:
    """The live ShardedFusedAdam whose buckets hold ``p``, or None: through the param's grad
    watch (sharded gradients, see [Note: a watch that leaves the user's objects usable]) or a
    ``link_owner`` link (replicated gradients)."""
    w = watch_of(p)
    if w is not None:
        return w.owner
    link = _LINKS.get(id(p))
    return link[1]() if link is not None and link[0]() is p else None


def owner_of(p: torch.Tensor) -> Any:
    """The optimizer these drop-ins hand ``p`` to: its holder, if the holder keeps the averaged
    gradients itself (sharded) or its norm spans model-parallel ranks (an ``mpu``); else None."""
    o = holder_of(p)
    return o if o is not None and (o.options.grads == "sharded" or o.options.mpu is not None) else None


def _split(parameters: Union[torch.Tensor, Iterable[torch.Tensor]]) -> tuple[Any, list[torch.Tensor]]:
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    owners = {id(o): o for o in (owner_of(p) for p in params) if o is not None}
    if not owners:
        return None, params
    if len(owners) > 1:
        raise ValueError("these params belong to several ShardedFusedAdam optimizers; clip each one's params "
                         "separately (opt.clip_grad_norm_(max_norm))")
    (opt,) = owners.values()
    ours = {id(p) for g in opt.param_groups for p in g["params"] if p.requires_grad}
    given = {id(p) for p in params if p.requires_grad}
    if not ours <= given:
        raise ValueError("clip_grad_norm_ got only some of the trainable params of a ShardedFusedAdam with "
                         "sharded gradients; it clips the global norm over all of them: pass all its params "
                         "(e.g. model.parameters())")
    return opt, [p for p in params if owner_of(p) is not opt]


def clip_grad_norm_(parameters: Union[torch.Tensor, Iterable[torch.Tensor]], max_norm: float,
                    norm_type: float = 2.0, error_if_nonfinite: bool = False, foreach: Any = None) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` that also clips a ShardedFusedAdam's sharded gradients.

    Returns:
        The total norm of the gradients (over every rank's averaged gradient), as torch does.

    Raises:
        ValueError: params of several sharded optimizers, or only some params of one.
        RuntimeError: ``error_if_nonfinite`` and the norm is not finite.
    """
    opt, rest = _split(parameters)
    if opt is None:
        return torch.nn.utils.clip_grad_norm_(rest, max_norm, norm_type, error_if_nonfinite, foreach)
    if any(p.grad is not None for p in rest if p.requires_grad):
        raise ValueError("clip_grad_norm_ got params with param.grad beside a ShardedFusedAdam's sharded ones; "
                         "a global norm over both is not supported: clip them separately")
    norm = opt.clip_grad_norm_(max_norm, norm_type)
    if error_if_nonfinite and not torch.isfinite(norm):
        raise RuntimeError(f"the total norm of order {norm_type} of the gradients is non-finite, so it cannot "
                           "be clipped (error_if_nonfinite=True)")
    return norm


def clip_grad_value_(parameters: Union[torch.Tensor, Iterable[torch.Tensor]], clip_value: float,
                     foreach: Any = None) -> None:
    """``torch.nn.utils.clip_grad_value_`` that also clamps a ShardedFusedAdam's sharded gradients."""
    opt, rest = _split(parameters)
    if rest:
        torch.nn.utils.clip_grad_value_(rest, clip_value, foreach)
    if opt is not None:
        opt.clip_grad_value_(clip_value)

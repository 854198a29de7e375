"""Noticing code that reads or zeroes ``param.grad`` while the gradients live in the optimizer.

[Note: watching param.grad]
With sharded gradients (ZeRO-2, the default) ``param.grad`` is None between backward and
``step()``: the averaged gradient lives in the optimizer's shards. Two things follow.
Code that reads ``param.grad`` there (``torch.nn.utils.clip_grad_norm_`` /
``clip_grad_value_``, per-layer norm logging, ``GradScaler.unscale_``) would silently see
nothing. And torch's zeroing idioms (``model.zero_grad()``, ``param.grad = None``,
hand-set gradients, loops that never zero, two steps on one backward) decide what the next
step sees, yet never touch the optimizer. So the optimizer watches: every watched param's
class is swapped for a subclass of its own class (``nn.Parameter`` or ``Tensor``) whose
``grad`` property tells a ``GradWatch`` about reads and writes before deferring to the real
attribute. After a step, a read or write of ``param.grad`` is how ``model.zero_grad()``
(which reads every grad), ``param.grad = None`` and hand-set gradients show themselves: the
reducer then forgets those params' gradient shards, and only those, which gives torch's
result for every zeroing idiom, for loops that never zero (gradients accumulate across
steps) and for two steps on one backward (the same gradients apply twice). A read that gets
None between backward and step makes ``step()`` warn once, naming the ways to clip. The
optimizer itself uses ``raw_grad`` / ``set_raw_grad`` (the C attribute, no Python
property), so only other code is seen and the hot path pays nothing. Params of any other
class (other libraries' tensor subclasses) are not watched: for them only
``opt.zero_grad()`` clears the shards.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn as nn

__all__ = ["GradWatch", "raw_grad", "set_raw_grad", "watch", "READ_NONE_WARNING"]

_GRAD = torch._C.TensorBase.__dict__["grad"]

READ_NONE_WARNING = (
    "param.grad was read between backward and step() and was None: with grads='sharded' (the default) the "
    "averaged gradients live in the optimizer, so torch.nn.utils.clip_grad_norm_ / clip_grad_value_, "
    "GradScaler.unscale_ and gradient logging over param.grad see nothing and clip nothing. Clip with "
    "ShardedFusedAdam(max_grad_norm=...), opt.clip_grad_norm_(max_norm) or "
    "sharded_fused_adam.clip_grad_norm_(params, max_norm), or build the optimizer with grads='replicated' "
    "to keep the averaged gradients in param.grad.")
_ATTR = "_sharded_fused_adam_grad_watch"


def raw_grad(p: torch.Tensor) -> Optional[torch.Tensor]:
    """``p.grad`` without telling any watch."""
    return _GRAD.__get__(p)


def set_raw_grad(p: torch.Tensor, value: Optional[torch.Tensor]) -> None:
    """``p.grad = value`` without telling any watch."""
    _GRAD.__set__(p, value)


class GradWatch:
    """What code other than the optimizer did with the watched params' ``grad``, by phase.

    The optimizer moves ``phase`` through ``IDLE`` (after a step), ``BACKWARD`` (from the
    first gradient of a backward) and ``HELD`` (after backward, until the step). A read in
    ``IDLE`` or a write outside ``BACKWARD`` marks the param as zeroed by its owner
    (``model.zero_grad()`` reads every grad; ``param.grad = None`` or ``= g`` writes one):
    ``take_touched`` hands those params over. A read that gets None in ``HELD`` sets
    ``read_none_while_held``.
    """

    IDLE, BACKWARD, HELD = 0, 1, 2
    __slots__ = ("phase", "touched", "read_none_while_held")

    def __init__(self) -> None:
        self.phase = GradWatch.IDLE
        self.touched: set[int] = set()
        self.read_none_while_held = False

    def on_read(self, p: torch.Tensor, value: Optional[torch.Tensor]) -> None:
        if self.phase == GradWatch.IDLE:
            self.touched.add(id(p))
        elif self.phase == GradWatch.HELD and value is None:
            self.read_none_while_held = True

    def on_write(self, p: torch.Tensor) -> None:
        if self.phase != GradWatch.BACKWARD:
            self.touched.add(id(p))

    def take_touched(self) -> set[int]:
        """The ids of the params zeroed or set by other code since the last call."""
        touched, self.touched = self.touched, set()
        return touched


def _get(self: torch.Tensor) -> Optional[torch.Tensor]:
    value = _GRAD.__get__(self)
    w = self.__dict__.get(_ATTR)
    if w is not None:
        w.on_read(self, value)
    return value


def _set(self: torch.Tensor, value: Optional[torch.Tensor]) -> None:
    _GRAD.__set__(self, value)
    w = self.__dict__.get(_ATTR)
    if w is not None:
        w.on_write(self)


def _delete(self: torch.Tensor) -> None:
    _GRAD.__delete__(self)
    w = self.__dict__.get(_ATTR)
    if w is not None:
        w.on_write(self)


class WatchedParameter(nn.Parameter):
    """An ``nn.Parameter`` whose ``grad`` reads and writes are seen (see [Note: watching param.grad])."""

    grad = property(_get, _set, _delete)


class WatchedTensor(torch.Tensor):
    """A plain leaf tensor whose ``grad`` reads and writes are seen."""

    __torch_function__ = torch._C._disabled_torch_function_impl  # results stay plain tensors
    grad = property(_get, _set, _delete)


_WATCHED: dict[type, type] = {nn.Parameter: WatchedParameter, torch.Tensor: WatchedTensor}
_PLAIN = {v: k for k, v in _WATCHED.items()}


def watch(params: Iterable[torch.Tensor], grad_watch: GradWatch) -> int:
    """Report the params' ``grad`` reads and writes to ``grad_watch``; returns how many are watched."""
    num = 0
    for p in params:
        cls = _WATCHED.get(type(p)) or (type(p) if type(p) in _PLAIN else None)
        if cls is None:
            continue
        p.__class__ = cls
        setattr(p, _ATTR, grad_watch)
        num += 1
    return num

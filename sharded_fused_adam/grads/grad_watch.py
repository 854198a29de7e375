"""Noticing code that reads or zeroes ``param.grad`` while the gradients live in the optimizer.

[Note: watching param.grad]
With sharded gradients (ZeRO-2, the default) ``param.grad`` is None between backward and
``step()``: the averaged gradient lives in the optimizer's shards. Two things follow. Code
that reads ``param.grad`` there (``torch.nn.utils.clip_grad_norm_`` / ``clip_grad_value_``,
per-layer norm logging) would silently see nothing. And torch's zeroing idioms
(``model.zero_grad()``, ``param.grad = None``, hand-set gradients, loops that never zero,
two steps on one backward) decide what the next step sees, yet never touch the optimizer. So
the optimizer watches: every watched param's class is swapped for a subclass of its own
class (``nn.Parameter`` or ``Tensor``) whose ``grad`` property tells the ``GradWatch`` about
reads and writes before deferring to the real attribute. What an access means depends on the
``GradPhase``, which the gradient strategy owns and moves. After a step (``STEPPED``), a
write of ``param.grad`` or a read by ``model.zero_grad()`` /
``torch.optim.Optimizer.zero_grad`` (which read every grad and find None) marks the param
zeroed: the strategy then forgets those params' gradient shards, and only those, which gives
torch's result for every zeroing idiom, for loops that never zero (gradients accumulate
across steps) and for two steps on one backward (the same gradients apply twice). A read by
any other code after a step is ambiguous: a hand-written
``if p.grad is not None: p.grad = None`` and a logging loop look the same, because both find
None. It is taken as zeroing (the common case), and if it made the step forget a gradient that no other zeroing did,
``forgotten()`` warns once that a loop which never zeroes and only logs would differ from
torch there. A read that gets None after backward (``REDUCED``) makes ``step()`` warn once,
naming the ways to clip, except the read by ``GradScaler.unscale_(opt)`` of the owning
optimizer: that optimizer declares ``_step_supports_amp_scaling`` and unscales its own
shards inside ``step()``, so the scaler finding no ``param.grad`` loses nothing (reads that
follow it, e.g. torch's clipping, still warn). The optimizer itself uses ``raw_grad`` /
``set_raw_grad`` (the C attribute, no Python property), so only other code is seen and the
hot path pays nothing. Params of any other class (other libraries' tensor subclasses) are
not watched: for them only ``opt.zero_grad()`` clears the shards.

[Note: a watch that leaves the user's objects usable]
Nothing is stored on a param: the watch is found through a module-level map from ``id(p)``
(with a weak reference that proves the entry is still that param) to its ``GradWatch``,
which also holds the optimizer weakly for the ``clip_grad_norm_`` drop-ins. The swapped
class owns its copy and pickle behaviour, as FSDP2's ``fully_shard`` owns its module class
swap: constructing it (``type(p)(data)``, as ``Parameter.__deepcopy__`` and many libraries
do) builds the original class; pickling, ``torch.save`` and ``copy.deepcopy`` produce the
original class; ``nn.Parameter(p)`` gets a plain ``nn.Parameter`` (torch sends any subclass
through ``detach()``, which here hands ``Parameter.__new__`` a tensor that turns plain when
flagged as a parameter). ``release()`` restores every live param's class; the gradient
strategy calls it when it is garbage-collected, i.e. when the optimizer goes.

Options weighed for the default (the watch stays the default, made non-invasive): hooks
only (no class swap) cannot tell ``model.zero_grad()`` from a loop that never zeroes, so
one of them would differ from torch silently; "the first gradient after a step overwrites"
is exact for every idiom that zeroes at any point of the loop, but loops that never zero
(or zero only some params by ``p.grad = None``) would silently lose their accumulation;
an opt-in watch makes the default that rule, and users of those idioms would have to know
to ask for it. ``grads="replicated"`` needs no watch at all, at the cost of a full gradient
buffer per rank.
"""
from __future__ import annotations

import copy
import enum
import inspect
import sys
import warnings
import weakref
from typing import Any, Iterable, Optional

import torch
import torch.nn as nn

__all__ = ["GradPhase", "GradWatch", "raw_grad", "release_when_collected", "set_raw_grad", "watch_of",
           "READ_NONE_WARNING"]

_GRAD = torch._C.TensorBase.__dict__["grad"]

READ_NONE_WARNING = (
    "param.grad was read between backward and step() and was None: with grads='sharded' (the default) the "
    "averaged gradients live in the optimizer, so torch.nn.utils.clip_grad_norm_ / clip_grad_value_ "
    "and gradient logging over param.grad see nothing and clip nothing. Clip with "
    "ShardedFusedAdam(max_grad_norm=...), opt.clip_grad_norm_(max_norm) or "
    "sharded_fused_adam.clip_grad_norm_(params, max_norm), or build the optimizer with grads='replicated' "
    "to keep the averaged gradients in param.grad.")
READ_AFTER_STEP_WARNING = (
    "param.grad was read after step() by code other than model.zero_grad() / opt.zero_grad() (it was None: "
    "with grads='sharded' the gradients live in the optimizer) and nothing zeroed those params otherwise, so "
    "the read was taken as zeroing them, as `if p.grad is not None: p.grad = None` does. If it only logged "
    "(a loop that never zeroes), torch would have kept accumulating those gradients across steps. Read "
    "gradients with grads='replicated', or zero explicitly with opt.zero_grad() to make the intent plain.")

# Reads from these only find None and mean "zero": no warning (see [Note: watching param.grad]).
_ZEROING_CODE = frozenset({nn.Module.zero_grad.__code__, inspect.unwrap(torch.optim.Optimizer.zero_grad).__code__})
_PARAMETER_NEW = nn.Parameter.__new__.__code__


class GradPhase(enum.Enum):
    """Where a step's gradients are; each gradient strategy owns one and moves it."""

    STEPPED = "stepped"  # since step() (or construction): what the strategy holds is the last step's
    BACKWARD = "backward"  # gradients arrived that are not averaged yet (a backward runs, or ran in no_sync())
    REDUCED = "reduced"  # a backward ended; its averaged gradients wait for step()


def raw_grad(p: torch.Tensor) -> Optional[torch.Tensor]:
    """``p.grad`` without telling any watch."""
    return _GRAD.__get__(p)


def set_raw_grad(p: torch.Tensor, value: Optional[torch.Tensor]) -> None:
    """``p.grad = value`` without telling any watch."""
    _GRAD.__set__(p, value)


_WATCHES: dict[int, tuple[weakref.ref, "GradWatch"]] = {}  # id(param) -> (the param, weakly; its watch)


def watch_of(p: torch.Tensor) -> Optional["GradWatch"]:
    """The live watch that sees ``p``'s ``grad``, or None."""
    entry = _WATCHES.get(id(p))
    return entry[1] if entry is not None and entry[0]() is p else None


class GradWatch:
    """What code other than the optimizer did with the watched params' ``grad``.

    Args:
        strategy: the gradient strategy whose ``phase`` (a ``GradPhase``) gives accesses
            their meaning; held weakly.
        owner: the optimizer the params belong to (for ``owner``), held weakly.
    """

    def __init__(self, strategy: Any, owner: Any = None, read_none_hint: str = ""):
        self._strategy = weakref.ref(strategy)
        self._read_none_hint = read_none_hint  # appended to READ_NONE_WARNING (e.g. under model parallelism)
        self._owner = weakref.ref(owner) if owner is not None else None
        self._params: dict[int, weakref.ref] = {}
        self.zeroed: set[int] = set()  # written, or read by a zeroing function, since the last take
        self.read: set[int] = set()  # read by other code after a step since the last take
        self._read_only: set[int] = set()  # of the last take: read, and not zeroed otherwise
        self.read_none_while_reduced = False
        self._warned: set[str] = set()

    @property
    def owner(self) -> Any:
        """The live optimizer these params belong to, or None."""
        return self._owner() if self._owner is not None else None

    def _phase(self) -> Optional[GradPhase]:
        strategy = self._strategy()
        return strategy.phase if strategy is not None else None

    # ---- installing and removing ---------------------------------------------------------
    def add(self, params: Iterable[torch.Tensor]) -> int:
        """Watch the params' ``grad`` reads and writes; returns how many are watched."""
        num = 0
        for p in params:
            cls = _WATCHED.get(type(p)) or (type(p) if type(p) in _PLAIN else None)
            if cls is None:
                continue
            previous = watch_of(p)
            if previous is not None and previous is not self:
                previous._params.pop(id(p), None)
            key = id(p)
            ref = weakref.ref(p, lambda _, key=key: _forget(key))
            _WATCHES[key] = (ref, self)
            self._params[key] = ref
            p.__class__ = cls
            num += 1
        return num

    def release(self) -> None:
        """Stop watching: every live param gets its original class back."""
        for key, ref in list(self._params.items()):
            p = ref()
            entry = _WATCHES.get(key)
            if entry is not None and entry[1] is self:
                del _WATCHES[key]
            if p is not None and type(p) in _PLAIN:
                p.__class__ = _PLAIN[type(p)]
        self._params.clear()

    # ---- what accesses mean ---------------------------------------------------------------
    def on_read(self, p: torch.Tensor, value: Optional[torch.Tensor], caller: Any) -> None:
        phase = self._phase()
        if phase is GradPhase.STEPPED:
            (self.zeroed if caller.f_code in _ZEROING_CODE else self.read).add(id(p))
        elif phase is GradPhase.REDUCED and value is None and not self._unscale_of_owner(caller):
            self.read_none_while_reduced = True

    def _unscale_of_owner(self, caller: Any) -> bool:
        # GradScaler.unscale_(owner): the owner unscales inside step() (see [Note: watching param.grad]).
        # Matched by name and instance, not by code object, so a subclass that overrides it counts too.
        owner = self.owner
        return (owner is not None and caller.f_code.co_name == "_unscale_grads_"
                and isinstance(caller.f_locals.get("self"), torch.amp.GradScaler)
                and caller.f_locals.get("optimizer") is owner)

    def on_write(self, p: torch.Tensor) -> None:
        if self._phase() is not GradPhase.BACKWARD:
            self.zeroed.add(id(p))

    def take_touched(self) -> set[int]:
        """The ids of the params zeroed, set or read by other code since the last call."""
        touched = self.zeroed | self.read
        self._read_only, self.zeroed, self.read = self.read - self.zeroed, set(), set()
        return touched

    def forgotten(self, ids: set[int]) -> None:
        """The strategy forgot these params' gradients after ``take_touched``: warn once if only
        an ambiguous read asked for it (see [Note: watching param.grad])."""
        if ids & self._read_only:
            self._warn_once(READ_AFTER_STEP_WARNING, stacklevel=4)

    def warn_read_none(self) -> None:
        """Warn (once) if ``param.grad`` was read as None between backward and ``step()``."""
        if self.read_none_while_reduced:
            self.read_none_while_reduced = False
            self._warn_once(READ_NONE_WARNING + self._read_none_hint, stacklevel=5)

    def _warn_once(self, message: str, stacklevel: int) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, RuntimeWarning, stacklevel=stacklevel + 1)


def release_when_collected(strategy: Any, hooks: list, grad_watch: Optional[GradWatch] = None) -> None:
    """When ``strategy`` is garbage-collected (with its optimizer), remove its hooks (the list is
    read then, so later handles count) and end ``grad_watch``: nothing it added outlives it."""
    weakref.finalize(strategy, _release, hooks, grad_watch)


def _release(hooks: list, grad_watch: Optional[GradWatch]) -> None:
    for handle in hooks:
        handle.remove()
    hooks.clear()
    if grad_watch is not None:
        grad_watch.release()


def _forget(key: int) -> None:
    entry = _WATCHES.get(key)
    if entry is not None and entry[0]() is None:
        del _WATCHES[key]


# ---- the watched classes ---------------------------------------------------------------------
def _get(self: torch.Tensor) -> Optional[torch.Tensor]:
    value = _GRAD.__get__(self)
    w = watch_of(self)
    if w is not None:
        w.on_read(self, value, sys._getframe(1))
    return value


def _set(self: torch.Tensor, value: Optional[torch.Tensor]) -> None:
    _GRAD.__set__(self, value)
    w = watch_of(self)
    if w is not None:
        w.on_write(self)


def _delete(self: torch.Tensor) -> None:
    _GRAD.__delete__(self)
    w = watch_of(self)
    if w is not None:
        w.on_write(self)


def _flag_as_param(self: torch.Tensor, value: bool) -> None:
    # Parameter.__new__'s path for subclasses flags detach()'s result: become a plain Parameter.
    if watch_of(self) is None and value:
        self.__class__ = nn.Parameter
    else:
        self.__dict__["_is_param"] = value


def _detach(self: torch.Tensor) -> torch.Tensor:
    plain = torch.Tensor.detach(self)
    if sys._getframe(1).f_code is _PARAMETER_NEW:  # nn.Parameter(p): see _flag_as_param
        plain.__class__ = type(self)
    return plain


class WatchedParameter(nn.Parameter):
    """An ``nn.Parameter`` whose ``grad`` reads and writes are seen (see [Note: watching param.grad])."""

    grad = property(_get, _set, _delete)
    _is_param = property(None, _flag_as_param)
    detach = _detach

    def __new__(cls, data: Optional[torch.Tensor] = None, requires_grad: bool = True) -> nn.Parameter:
        return nn.Parameter(data, requires_grad)  # constructing the swapped class builds the original

    def __deepcopy__(self, memo: dict) -> nn.Parameter:
        if id(self) not in memo:
            memo[id(self)] = nn.Parameter(self.data.clone(memory_format=torch.preserve_format), self.requires_grad)
        return memo[id(self)]


class WatchedTensor(torch.Tensor):
    """A plain leaf tensor whose ``grad`` reads and writes are seen."""

    __torch_function__ = torch._C._disabled_torch_function_impl  # results stay plain tensors
    grad = property(_get, _set, _delete)
    _is_param = property(None, _flag_as_param)
    detach = _detach

    def __new__(cls, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.Tensor(*args, **kwargs)

    def __reduce_ex__(self, proto: int) -> Any:
        return _plain_alias(self).__reduce_ex__(proto)

    def __deepcopy__(self, memo: dict) -> torch.Tensor:
        if id(self) not in memo:
            memo[id(self)] = copy.deepcopy(_plain_alias(self), memo)
        return memo[id(self)]


def _plain_alias(t: torch.Tensor) -> torch.Tensor:
    """A plain leaf ``Tensor`` sharing ``t``'s storage, ``requires_grad``, grad and attributes."""
    alias = torch.Tensor.detach(t).requires_grad_(t.requires_grad)
    grad = raw_grad(t)
    if grad is not None:
        set_raw_grad(alias, grad)
    alias.__dict__.update(t.__dict__)
    return alias


_WATCHED: dict[type, type] = {nn.Parameter: WatchedParameter, torch.Tensor: WatchedTensor}
_PLAIN = {v: k for k, v in _WATCHED.items()}

"""Parameter gathers that ``step()`` starts and the first read of each bucket's params waits for.

[Note: overlapped parameter gather]
With ``overlap=True`` ``step()`` returns once every bucket's gather is in flight; the next
forward (or anything else) runs while they finish. A read of a param before its bucket's
gather finished would see the old values of the other ranks' shards, so every read waits
for exactly the bucket it touches:

* A ``TorchFunctionMode`` (``_ReadGuard``) is pushed while gathers are in flight. Every
  torch function, method and tensor property called in this thread passes through it: one
  whose arguments include a param of a pending bucket, a view of one (``_base``) or a
  bucket's flat buffer first waits for that bucket. That covers module forwards in any
  order, tied params, params read outside any module (in the loss, in a custom function),
  ``no_grad``/eval forwards, ``model.state_dict()`` (``detach``), ``torch.save``, ``.data``,
  ``copy.deepcopy``, in-place writes such as ``load_state_dict``. Calls that touch only
  metadata or ``.grad`` (``model.zero_grad()``, shapes) do not wait. Anything this module
  does not see (another thread, C++ holding raw pointers) must call
  ``ShardedFusedAdam.wait_for_gathers()`` first.
* A global module forward pre-hook (registered only while gathers are in flight) waits for
  the buckets of the module's own params, and for everything before a compiled module
  (``torch.compile(model)``), so dynamo never traces through a pending gather. It is also
  where the guard is taken off once the last gather has finished (it cannot remove itself
  from inside ``__torch_function__``).
* Gathers are started in the order the params are first needed, learned during the first
  overlapped forward and agreed across ranks (rank 0's observation is broadcast, once, at
  the second launch; until then: reverse bucket order, which is forward order for models
  whose params are registered in call order because buckets follow backward order).
* On CUDA/NPU ``Pending.wait()`` makes the current stream wait for the collective (no host
  sync) unless a ``collective_timeout`` asks for a bounded host-side wait.

The optimizer calls ``wait_all()`` at each of its own entry points that read or write
params or their buffers (step, shard_state and so state_dict / load_state_dict / sharded
checkpoints, refresh_masters, add_param_group), so results are bitwise the same as with
``overlap=False``. It is off by default: on gloo with 2 ranks on 2 CPU cores it measured
slower (1.03x DDP's step time against 0.95x without it, docs/benchmarks.md), because no core
is idle for the transfer to overlap with and the guard costs ~5 us per torch call.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, Optional, Sequence

import torch
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from .plans import CommPlan, Pending

__all__ = ["ParamGather"]


def _compiled(module: torch.nn.Module) -> bool:
    """``torch.compile(module)``'s wrapper, or a module compiled in place (``module.compile()``)."""
    attrs = module.__dict__
    return attrs.get("_orig_mod") is not None or attrs.get("_compiled_call_impl") is not None


# Calls that read or set only a param's metadata or its .grad, never its values: they do not
# wait (``model.zero_grad()`` and the optimizer's own hooks touch ``.grad`` of every param).
_METADATA_ONLY = frozenset([
    torch.Tensor.grad.__get__, torch.Tensor.grad.__set__, torch.Tensor.shape.__get__,
    torch.Tensor.dtype.__get__, torch.Tensor.device.__get__, torch.Tensor.requires_grad.__get__,
    torch.Tensor.is_leaf.__get__, torch.Tensor.grad_fn.__get__, torch.Tensor.ndim.__get__,
    torch.Tensor.size, torch.Tensor.numel, torch.Tensor.dim,
])


class _ReadGuard(TorchFunctionMode):
    """Waits for a pending bucket before any torch call that touches its params."""

    def __init__(self, owner: "ParamGather"):
        super().__init__()
        self._owner = weakref.ref(owner)

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: Optional[dict] = None):
        owner = self._owner()
        kwargs = kwargs or {}
        if owner is not None and owner.pending_ids and func not in _METADATA_ONLY:
            owner.wait_for_args(args)
            if kwargs:
                owner.wait_for_args(tuple(kwargs.values()))
        return func(*args, **kwargs)


class ParamGather:
    """Starts each bucket's parameter gather and waits for it at the latest possible moment.

    Args:
        plan: the collectives (its ``gather`` fills a flat buffer from every shard owner).
        params: each bucket's params, by bucket index (they are views into its flat buffer).
        overlap: return from ``release()`` with the gathers in flight (see
            [Note: overlapped parameter gather]); False waits for them there.
    """

    def __init__(self, plan: CommPlan, params: Sequence[Sequence[torch.Tensor]], *, overlap: bool):
        self._plan = plan
        self.overlap = overlap
        self._params: list[list[torch.Tensor]] = []
        self._pending: dict[int, Pending] = {}
        self.pending_ids: dict[int, int] = {}  # id of a pending bucket's param or flat buffer -> bucket
        self._flats: dict[int, torch.Tensor] = {}
        self._guard: Optional[_ReadGuard] = None
        self._hook: Optional[RemovableHandle] = None
        self._launches = 0
        self._first_use: list[int] = []
        self._order: Optional[list[int]] = None
        self.add_buckets(params)

    def add_buckets(self, params: Sequence[Sequence[torch.Tensor]]) -> None:
        """Take over more buckets (``add_param_group``); they join the end of the order."""
        self.wait_all()
        first = len(self._params)
        self._params.extend(list(p) for p in params)
        if self._order is not None:
            self._order.extend(range(first, len(self._params)))

    # ---- launching ----------------------------------------------------------------------
    def gather_order(self, buckets: Sequence[int]) -> list[int]:
        """The order to start ``buckets``' gathers in; a collective at the second launch."""
        self.wait_all()
        self._launches += 1
        if self._order is None and self.overlap and self._launches == 2:
            n = len(self._params)
            seen = list(dict.fromkeys(self._first_use))
            local = seen + [b for b in reversed(range(n)) if b not in seen]
            device = self._params[0][0].device
            order = torch.tensor(local, dtype=torch.int64, device=device)
            self._order = self._plan.broadcast_(order, what="broadcast of the param gather order").tolist()
        order = self._order if self._order is not None else list(reversed(range(len(self._params))))
        wanted = set(buckets)
        return [b for b in order if b in wanted]

    def start(self, b: int, flat: torch.Tensor) -> None:
        """Start bucket ``b``'s gather into ``flat`` (its params' buffer)."""
        assert b not in self._pending, b
        self._pending[b] = self._plan.gather(flat, f"params of bucket {b}")
        self._flats[b] = flat
        self.pending_ids[id(flat)] = b
        for p in self._params[b]:
            self.pending_ids[id(p)] = b

    def release(self) -> None:
        """The step is done starting gathers: wait for them now, or guard reads until they finish."""
        if not self._pending:
            return
        if not self.overlap:
            self.wait_all()
            return
        if self._guard is None:
            self._guard = _ReadGuard(self)
            torch._C._push_on_torch_function_stack(self._guard)
        if self._hook is None:
            ref = weakref.ref(self)
            self._hook = torch.nn.modules.module.register_module_forward_pre_hook(
                lambda module, args, r=ref: _pre_hook(r, module))

    # ---- waiting ------------------------------------------------------------------------
    def wait(self, b: int) -> None:
        """Wait for bucket ``b``'s gather (if it is in flight)."""
        pending = self._pending.pop(b, None)
        if pending is None:
            return
        if self._launches == 1:
            self._first_use.append(b)
        del self.pending_ids[id(self._flats.pop(b))]
        for p in self._params[b]:
            self.pending_ids.pop(id(p), None)
        pending.wait()

    def wait_for_args(self, args: tuple) -> None:
        """Wait for the buckets of any pending param (or view of one) among ``args``."""
        ids = self.pending_ids
        for a in args:
            if isinstance(a, torch.Tensor):
                b = ids.get(id(a))
                if b is None and a._base is not None:
                    b = ids.get(id(a._base))
                if b is not None:
                    self.wait(b)
            elif isinstance(a, (list, tuple)) and a and ids:
                self.wait_for_args(tuple(a))
            if not ids:
                return

    def wait_module(self, module: torch.nn.Module) -> None:
        """Before ``module``'s forward: wait for its own params' buckets (all, if it is compiled)."""
        if _compiled(module):
            self.wait_all()
        else:
            ids = self.pending_ids
            for p in module._parameters.values():
                b = ids.get(id(p)) if p is not None else None
                if b is not None:
                    self.wait(b)
        if not self._pending:
            self._unguard()

    def wait_all(self) -> None:
        """Wait for every gather in flight and take the read guard off."""
        for b in list(self._pending):
            self.wait(b)
        self._unguard()

    @property
    def in_flight(self) -> list[int]:
        """Buckets whose gathers are still in flight, in start order."""
        return list(self._pending)

    def _unguard(self) -> None:
        guard = self._guard
        if guard is not None:
            depth = torch._C._len_torch_function_stack()
            if not (depth and torch._C._get_function_stack_at(depth - 1) is guard):
                return  # a mode pushed after ours is on top: keep the hook and retry at the next one
            torch._C._pop_torch_function_stack()
            self._guard = None
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def _pre_hook(ref: weakref.ref, module: torch.nn.Module) -> None:
    gather = ref()
    if gather is not None and not torch.compiler.is_compiling():
        gather.wait_module(module)

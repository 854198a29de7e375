"""Backward hooks of the gradient strategies, ``no_sync()``, and the user's pre-reduce hooks.

[Note: pre-reduce hooks]
Model-parallel reductions of gradients (sequence-parallel LayerNorm grads summed over the
tensor-parallel group, embeddings tied across pipeline stages) must run while the gradients
are still in ``param.grad``; with sharded gradients they leave it during backward. A hook
registered with ``register_pre_reduce_hook`` runs once before the gradients are taken: at the
end of a synced backward, or inside ``step()`` (``finish()``) for gradients accumulated under
``no_sync()`` or set by hand. While any hook is registered, gradients are taken only then
(the reductions no longer overlap backward). Hooks that communicate across pipeline stages
must not run inside a backward (the other stage may be waiting for this one's output
gradient): run every micro-batch's backward under ``no_sync()`` and they run in ``step()``.
"""
from __future__ import annotations

import contextlib
import weakref
from collections import OrderedDict
from typing import Callable, Iterator, Optional

import torch
from torch.utils.hooks import RemovableHandle

__all__ = ["register_grad_hook", "SyncSwitch", "PRE_REDUCE_HINT"]

PRE_REDUCE_HINT = (" Code that reduces param.grad across model-parallel ranks (sequence-parallel norms, embeddings "
                   "tied across pipeline stages, `if p.grad is not None: all_reduce(p.grad)`) found None and did "
                   "nothing: run it in opt.register_pre_reduce_hook(fn), where param.grad still holds the gradients.")


def register_grad_hook(p: torch.Tensor, strategy: object) -> torch.utils.hooks.RemovableHandle:
    """Call ``strategy.on_grad_ready(p)`` after each accumulation into ``p.grad``; the hook holds
    the strategy weakly, so a dropped optimizer is not kept alive by its model."""
    ref = weakref.ref(strategy)

    def hook(param: torch.Tensor) -> None:
        target = ref()
        if target is not None:
            target.on_grad_ready(param)

    return p.register_post_accumulate_grad_hook(hook)


class SyncSwitch:
    """``no_sync()`` and the pre-reduce hooks ([Note: pre-reduce hooks]) of a gradient strategy."""

    _sync = True
    _pre_reduce_hooks: Optional["OrderedDict[int, Callable[[], None]]"] = None

    def register_pre_reduce_hook(self, hook: Callable[[], None]) -> RemovableHandle:
        """Run ``hook()`` before gradients leave ``param.grad`` (see [Note: pre-reduce hooks])."""
        if not callable(hook):
            raise TypeError(f"hook must be callable, got {type(hook).__name__}")
        if self._pre_reduce_hooks is None:
            self._pre_reduce_hooks = OrderedDict()
        handle = RemovableHandle(self._pre_reduce_hooks)
        self._pre_reduce_hooks[handle.id] = hook
        return handle

    @property
    def has_pre_reduce_hooks(self) -> bool:
        return bool(self._pre_reduce_hooks)

    def run_pre_reduce_hooks(self) -> None:
        for hook in list((self._pre_reduce_hooks or {}).values()):
            hook()

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally in ``param.grad``; the next synced backward reduces them."""
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

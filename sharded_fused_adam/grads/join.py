"""Uneven inputs: ``torch.distributed.algorithms.Join`` support, the joined rank shadowing each step.

[Note: uneven inputs]
Under ``with Join([opt]):`` a rank that ran out of batches leaves its loop while the others
go on. Every step of the others issues collectives (the gradient reduction, started during
backward; the agreement on overflow, norm and which params have gradients; the gather of
the updated shards), so the joined rank must issue the same ones, in the same order, or
every rank hangs. Join's protocol: before each iteration's first collective a rank that
still has inputs all-reduces a 1 (``Join.notify_join_context``); the joined rank all-reduces
a 0 and, while the sum is not 0, runs ``main_hook`` once. Here:

* The notification is made once per step, before the first collective of the step: a
  tensor hook on every trainable param (tensor hooks run before the post-accumulate hooks
  that start reductions) or, for a step without a backward, a step pre-hook.
* ``main_hook`` runs one step of the optimizer's own code on zero gradients: it drops this
  rank's gradients, back-propagates ``0 * p.sum()`` into one param (a backward is what
  starts the reduction, so its collectives are the others'), and calls ``step()``. The
  joined rank contributes zeros, so the averaged gradient is the sum over the ranks that
  still have inputs divided by the initial world size: DDP's Join default
  (``divide_by_initial_world_size=True``); ``False`` is refused. Its zero gradient in that one
  param marks the param as having a gradient, so a param no other rank gave a gradient to
  that step still advances (on an all-zero gradient).
* The others' step must be one backward (or several under ``no_sync()`` and one without)
  and one ``step()``: several reducing backwards per step cannot be shadowed.
* A DDP-wrapped model is refused: DDP's own join hook shadows its all-reduce without
  keeping the result, so the joined rank could not update its shard of the params.
  ``torch.amp.GradScaler`` is not supported under Join either (the joined rank's step does
  not see the scaler's scale); ``loss_scale=`` is.
"""
from __future__ import annotations

import weakref
from typing import Any, Optional

import torch
from torch.distributed.algorithms.join import Join, Joinable, JoinHook, _JoinConfig

from .reducer import find_ddp

__all__ = ["JoinableOptimizer", "ShadowStep"]


class ShadowStep(JoinHook):
    """The join hook of one optimizer (see [Note: uneven inputs]); made once, reused by every Join.

    It holds the optimizer weakly: the params' hooks hold it, and must not keep a dropped
    optimizer alive.
    """

    def __init__(self, opt: Any):
        self._opt = weakref.ref(opt)
        self._notified = False
        self._shadowing = False
        self._trainable = [p for g in opt.param_groups for p in g["params"] if p.requires_grad and p.numel()]
        if not self._trainable:
            raise ValueError("Join needs an optimizer with at least one trainable param")
        self._handles = [p.register_hook(self._on_grad) for p in self._trainable]
        self._handles.append(opt.register_step_pre_hook(lambda *_: self._notify()))
        self._handles.append(opt.register_step_post_hook(lambda *_: self._step_done()))

    def _on_grad(self, grad: torch.Tensor) -> None:
        self._notify()

    def _notify(self) -> None:
        opt = self._opt()
        if opt is not None and not (self._notified or self._shadowing):
            self._notified = True
            Join.notify_join_context(opt)  # one all-reduce; nothing outside Join or when not the first joinable

    def _step_done(self) -> None:
        self._notified = False

    def main_hook(self) -> None:
        """Run one step on zero gradients: the same collectives as the others' step."""
        opt, p = self._opt(), self._trainable[0]
        self._shadowing = True
        try:
            opt.zero_grad(set_to_none=True)
            with torch.enable_grad():
                (p.sum() * 0).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        finally:
            self._shadowing = False

    def post_hook(self, is_last_joiner: bool) -> None:
        """Every rank has joined: the params agree already (each step gathered them). Join leaves
        its config on the joinable; reset it, so that later steps notify no one."""
        self._notified = False
        opt = self._opt()
        if opt is not None:
            opt._join_config = _JoinConfig.construct_disabled_join_config()


class JoinableOptimizer(Joinable):
    """Makes an optimizer a ``Joinable`` (``Join([opt])``), as torch's ZeroRedundancyOptimizer is.

    ``torch.optim.Optimizer.__init__`` never calls ``Joinable.__init__``, hence the class-level
    disabled join config; ``Join`` sets its own on the instance.
    """

    _join_config = _JoinConfig.construct_disabled_join_config()
    _join_shadow: Optional[ShadowStep] = None

    def join_hook(self, **kwargs: Any) -> JoinHook:
        """The hook ``Join`` runs on this rank once its inputs ran out (see [Note: uneven inputs]).

        Args:
            **kwargs: Join's keyword arguments; ``divide_by_initial_world_size`` must be True
                (the default), other keys are for other joinables.

        Raises:
            ValueError: ``divide_by_initial_world_size=False``, or a DDP-wrapped model.
        """
        if kwargs.get("divide_by_initial_world_size", True) is not True:
            raise ValueError("divide_by_initial_world_size=False is not supported by ShardedFusedAdam under Join: "
                             "a joined rank contributes zero gradients and the sum is divided by the initial "
                             "world size (DDP's default)")
        params = [p for g in self.param_groups for p in g["params"]]
        if self.options.reduce_gradients is False or find_ddp(params):
            raise ValueError("Join with a DistributedDataParallel model is not supported by ShardedFusedAdam: "
                             "DDP's join hook does not keep the averaged gradients on a joined rank, so that "
                             "rank could not update its shard. Pass the unwrapped model's params "
                             "(ShardedFusedAdam averages the gradients itself) and use Join([opt])")
        if self._join_shadow is None:
            self._join_shadow = ShadowStep(self)
        return self._join_shadow

    @property
    def join_device(self) -> torch.device:
        """The device of the optimizer's params (Join's own all-reduces run there)."""
        return self.device

    @property
    def join_process_group(self) -> Any:
        """The data-parallel group the optimizer's collectives use."""
        return self.process_group

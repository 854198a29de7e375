"""Test support: the few internals that tests observe or perturb, named in one place.

Tests use the public API (``shard_state()`` for buckets, ``max_grad_norm``, ...) and, where
they must look inside a step (how many reductions started during backward, which gathers
are still in flight) or inject a fault or a delay into the parameter gathers, these
functions. They are not part of the training API and may change with the internals; keeping
them here means a refactor changes one module, not every test that relies on them.
"""
from __future__ import annotations

from typing import Any, Callable

from .optimizer import ShardedFusedAdam

__all__ = ["reductions_started", "gathers_in_flight", "wrap_gather_plan"]


def reductions_started(opt: ShardedFusedAdam) -> int:
    """Buckets of the current backward whose gradient reduction has started."""
    return opt._grads.num_launched


def gathers_in_flight(opt: ShardedFusedAdam) -> int:
    """Param gathers the last ``step()`` left running (``overlap_param_gather``)."""
    return len(opt._param_gather.in_flight)


def wrap_gather_plan(opt: ShardedFusedAdam, wrap: Callable[[Any], Any]) -> None:
    """Route the param gathers through ``wrap(plan)``: an object with the plan's methods that
    may delay or fail them (``gather(flat, what)`` is called once per bucket and step)."""
    gather = opt._param_gather
    gather._plan = wrap(gather._plan)

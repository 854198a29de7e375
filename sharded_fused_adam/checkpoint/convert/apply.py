"""Load a ``NamedState`` into a live optimizer's shards, each rank reading only the ranges it owns.

Not a collective: every rank maps its own fragments onto the checkpoint's pieces through the
staged-load skeleton every loader shares (see [Note: staged load] in staging.py): everything is
validated first and written through ``Bucket.load_state`` only when all of it was read.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from ...kernels.rule import MASTER_KEY
from ..gathered import HasShardState, merged_groups
from ..staging import StagedLoad
from ..state_view import ShardState
from .state import CheckpointError, NamedState, check_complete, group_hyperparameters

__all__ = ["param_fqns", "load_named"]

Names = Union[nn.Module, Sequence[Optional[str]], Mapping[int, str]]


def param_fqns(shards: ShardState, names: Optional[Names] = None) -> list[Optional[str]]:
    """Every optimizer param's FQN by global index.

    Args:
        shards: the optimizer's shard state.
        names: the model (FQNs by identity from ``named_parameters()``), a list by index, or
            None to use the groups' ``param_names`` (an optimizer built from ``named_parameters()``).

    Raises:
        ValueError: a param has no name.
    """
    params = [p for g in shards.param_groups for p in g["params"]]
    if isinstance(names, nn.Module):
        by_id = {id(p): n for n, p in names.named_parameters(remove_duplicate=False)}
        out = [by_id.get(id(p)) for p in params]
    elif isinstance(names, Mapping):
        out = [names.get(i) for i in range(len(params))]
    elif names is not None:
        out = list(names)
        if len(out) != len(params):
            raise ValueError(f"got {len(out)} param names for an optimizer with {len(params)} params")
    else:
        out = [n for g in shards.param_groups for n in g.get("param_names", [None] * len(g["params"]))]
    trainable = {s.index for b in shards.buckets for s in b.layout.slots}
    unnamed = [i for i in trainable if out[i] is None]
    if unnamed:
        raise ValueError(f"params {unnamed[:5]} have no name: pass the model (or a list of names), or build the "
                         "optimizer from model.named_parameters()")
    return out


def _saved_groups(shards: ShardState, state: NamedState, fqns: list[Optional[str]]) -> list[dict[str, Any]]:
    """Our groups with the checkpoint's hyperparameters, group by group; params of one group of ours
    must come from one group of the checkpoint."""
    group_of = state.group_of()
    saved, start = [], 0
    for gi, group in enumerate(shards.param_groups):
        names = [fqns[start + i] for i in range(len(group["params"])) if fqns[start + i] in group_of]
        origins = sorted({group_of[n] for n in names})
        if len(origins) > 1:
            raise CheckpointError(f"{state.source}: params of param group {gi} come from checkpoint groups {origins}")
        entry = {k: v for k, v in group.items() if k != "params"}
        if origins:
            entry.update(group_hyperparameters(state.groups[origins[0]]))
        entry["params"] = list(range(start, start + len(group["params"])))
        start += len(group["params"])
        saved.append(entry)
    return saved


@torch.no_grad()
def load_named(opt: HasShardState, state: NamedState, names: Optional[Names] = None) -> None:
    """Load a checkpoint read by any converter into this rank's shards (any world size).

    Args:
        opt: a ``ShardedFusedAdam``.
        state: what ``read_deepspeed``/``read_universal``/``read_dcp``/... returned.
        names: how to name the optimizer's params (see :func:`param_fqns`).

    Raises:
        CheckpointError: a param of the model missing from the checkpoint (or the reverse), a
            missing moment or step, a size that differs; nothing is changed then.
    """
    shards = opt.shard_state()
    fqns = param_fqns(shards, names)
    trainable = sorted({s.index for b in shards.buckets for s in b.layout.slots})
    check_complete(state, [fqns[i] for i in trainable])
    shapes = shards.param_shapes()
    for i in trainable:
        saved = state.params[fqns[i]].shape
        if tuple(saved) != tuple(shapes[i]):
            raise CheckpointError(f"{state.params[fqns[i]].file}: param {fqns[i]!r} has shape {tuple(saved)} "
                                  f"in the checkpoint, {tuple(shapes[i])} in the model")
    try:
        new_groups = merged_groups(shards, _saved_groups(shards, state, fqns))
    except ValueError as exc:
        raise CheckpointError(f"{state.source}: {exc}") from exc
    def read(key: str, index: int, start: int, end: int, out: torch.Tensor) -> bool:
        name = fqns[index]
        tensor = state.weights.get(name) if key == MASTER_KEY else state.params[name].tensors.get(key)
        if tensor is None:
            return False
        tensor.read(start, end, out)
        return True

    staging = StagedLoad(shards)  # see [Note: staged load]
    staging.fill(read)
    staging.commit(new_groups, lambda i: state.params[fqns[i]].step)

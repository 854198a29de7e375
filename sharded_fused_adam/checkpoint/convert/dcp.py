"""``torch.distributed.checkpoint`` (DCP) in the layout ``get_optimizer_state_dict`` gives for torch Adam.

See [Note: DCP chunks of flat shards] in ``dcp_chunks.py`` for how flat shards become DCP chunks.

Keys (under ``key``, default ``"optimizer"``) are ``state.<FQN>.{step, exp_avg, exp_avg_sq,
[max_exp_avg_sq], [master_param]}`` and the param groups both nested (``param_groups.<i>.<name>``,
what ``get_optimizer_state_dict`` gives) and flattened (``param_groups.<FQN>.<name>``, what
``flatten_optimizer_state_dict=True`` and torchtitan give), so either kind of job loads ours.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from ...core.bucket import Bucket
from ...kernels.rule import ADAM
from ..gathered import HasShardState, merged_groups, saved_groups
from ..outputs import staged_dir
from ..staging import StagedLoad, staged_keys
from .apply import Names, param_fqns
from .dcp_chunks import FlatChunks, SavePlanner, load_values, read_metadata, storage_writer
from .state import (HYPERPARAMETERS, IMPLEMENTATION_KEYS, MASTER_KEY, MOMENT_KEYS, SHAPE_KEY, CheckpointError, NamedState, ParamState,
                    Piece, StateTensor, check_complete)

__all__ = ["save_dcp", "load_dcp", "read_dcp", "write_dcp"]

PathLike = Union[str, os.PathLike]


def _torch_groups(groups: list[dict], fqns: list[Optional[str]]) -> list[dict[str, Any]]:
    return [{**{k: v for k, v in g.items() if k not in ("params", "param_names")},
             "params": [fqns[i] for i in g["params"] if fqns[i] is not None]} for g in groups]


def _with_flat_groups(sd: dict[str, Any]) -> dict[str, Any]:
    """Add torchtitan's flattened ``param_groups.<FQN>.<name>`` entries beside the nested groups."""
    for group in sd["param_groups"]:
        for fqn in group["params"]:
            for name, value in group.items():
                if name != "params":
                    sd[f"param_groups.{fqn}.{name}"] = value
    return sd


def save_dcp(opt: HasShardState, path: PathLike, names: Optional[Names] = None, *, key: str = "optimizer") -> None:
    """Save through ``dcp.save``; a collective, each rank writing only the bytes it owns.

    Args:
        opt: a ``ShardedFusedAdam``.
        path: the DCP checkpoint folder (``checkpoint_id``).
        names: how to name params (see ``param_fqns``; default: the groups' ``param_names``).
        key: the top-level key the optimizer state goes under ("" for none).
    """
    shards = opt.shard_state()
    fqns = param_fqns(shards, names)
    state: dict[str, dict[str, Any]] = {}
    for bucket in shards.buckets:
        tensors = bucket.state_shards()
        for slot, s in enumerate(bucket.layout.slots):
            state.setdefault(fqns[s.index], {})["step"] = torch.tensor(float(bucket.steps[slot]))
        for frag in bucket.fragments:
            shape = bucket.params[frag.slot].shape
            for k, shard in tensors.items():
                view = shard.detach().narrow(0, frag.shard_offset, frag.numel)
                state[fqns[frag.index]][k] = FlatChunks(shape, view, frag.param_start, shard.dtype)
    sd = _with_flat_groups({"state": state, "param_groups": _torch_groups(saved_groups(shards), fqns)})
    dcp.save({key: sd} if key else sd, storage_writer=storage_writer(path), process_group=shards.plan.group,
             planner=SavePlanner())


def _describe(path: PathLike, prefix: str) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Per FQN the saved tensor metadata by state key, and the param groups (hyperparameters and FQNs)."""
    md = read_metadata(path).state_dict_metadata
    entries: dict[str, dict[str, Any]] = {}
    head = f"{prefix}state."
    for key, value in md.items():
        if key.startswith(head):
            fqn, _, name = key[len(head):].rpartition(".")
            if name in MOMENT_KEYS + ("step", MASTER_KEY):
                entries.setdefault(fqn, {})[name] = value
    if not entries:
        raise CheckpointError(f"{path}/.metadata has no optimizer state under {head!r}*")
    groups_head = f"{prefix}param_groups."
    nested = sorted(int(k[len(groups_head):].split(".")[0]) for k in md
                    if k.startswith(groups_head) and k.endswith(".params") and k[len(groups_head):-7].isdigit())
    names = HYPERPARAMETERS + IMPLEMENTATION_KEYS + ("params",)
    wanted = {f"{groups_head}{g}.{h}": None for g in nested for h in names if f"{groups_head}{g}.{h}" in md}
    values = load_values(path, dict(wanted)) if wanted else {}
    groups = [{h: values[f"{groups_head}{g}.{h}"] for h in names if f"{groups_head}{g}.{h}" in values}
              for g in nested]
    if not groups or any("params" not in g for g in groups):
        groups = [{"params": sorted(entries)}]  # no nested groups: one group, our hyperparameters kept
    return entries, groups


def _check(path: PathLike, entries: dict, groups: list[dict], required: list[str]) -> None:
    amsgrad = {n: bool(g.get("amsgrad")) for g in groups for n in g["params"]}
    for fqn in required:
        have = entries.get(fqn, {})
        needed = [*ADAM.keys_for({"amsgrad": amsgrad.get(fqn)}), "step"]
        for k in needed:
            if k not in have:
                raise CheckpointError(f"{path}/.metadata: param {fqn!r} has no {k!r} (found {sorted(have)})")


def load_dcp(opt: HasShardState, path: PathLike, names: Optional[Names] = None, *, key: str = "optimizer") -> None:
    """Load a DCP checkpoint of torch Adam's layout (ours, FSDP2's, torchtitan's) at any world size.

    A collective (``dcp.load``); each rank reads only the chunks overlapping its fragments.
    Everything is checked against the checkpoint's metadata first; on error nothing changes.

    Raises:
        CheckpointError: a param without ``exp_avg``/``exp_avg_sq``/``step`` (or
            ``max_exp_avg_sq`` under amsgrad), or of another shape.
    """
    shards = opt.shard_state()
    fqns = param_fqns(shards, names)
    prefix = f"{key}." if key else ""
    entries, groups = _describe(path, prefix)
    shapes = shards.param_shapes()
    trainable = sorted({s.index for b in shards.buckets for s in b.layout.slots})
    _check(path, entries, groups, [fqns[i] for i in trainable])
    for i in trainable:
        saved = entries[fqns[i]][SHAPE_KEY].size
        if tuple(saved) != tuple(shapes[i]):
            raise CheckpointError(f"{path}/.metadata: param {fqns[i]!r} has shape {tuple(saved)}, the model's "
                                  f"{tuple(shapes[i])}")
    def keys(bucket: Bucket) -> list[str]:  # the moments always (checked above); the rest where every param has it
        return [k for k in staged_keys(bucket)
                if k in ADAM.moment_keys or all(k in entries[fqns[s.index]] for s in bucket.layout.slots)]

    staging = StagedLoad(shards, keys)  # see [Note: staged load]
    wanted: dict[str, Any] = {f"{prefix}state.{fqns[s.index]}.step": torch.tensor(0.0)
                              for bucket in shards.buckets for s in bucket.layout.slots}
    for v in staging.views():
        shape = v.bucket.params[v.fragment.slot].shape
        wanted[f"{prefix}state.{fqns[v.fragment.index]}.{v.key}"] = FlatChunks(shape, v.out, v.fragment.param_start,
                                                                                v.out.dtype)
    load_values(path, wanted, shards.plan.group, no_dist=shards.world_size == 1)
    by_name = {n: g for g in groups for n in g["params"]}
    saved = []
    for g in saved_groups(shards):
        first = next((by_name[fqns[i]] for i in g["params"] if fqns[i] in by_name and fqns[i] in entries), {})
        saved.append({**g, **{h: first[h] for h in HYPERPARAMETERS + ("maximize",) if h in first}})  # maximize: refused
    try:
        new_groups = merged_groups(shards, saved)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    staging.commit(new_groups, lambda i: int(wanted[f"{prefix}state.{fqns[i]}.step"].item()))


class _DCPTensor:
    """Reads one saved tensor whole on first use (offline, no process group) and slices it."""

    def __init__(self, path: PathLike, key: str, md: TensorStorageMetadata):
        self.path, self.key, self.md, self.cache = path, key, md, None

    def read(self, start: int, end: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.cache is None:
            target = torch.empty(self.md.size, dtype=self.md.properties.dtype)
            self.cache = load_values(self.path, {self.key: target})[self.key].reshape(-1)
        value = self.cache[start:end]
        if end >= self.cache.numel():
            self.cache = None  # read to the end: readers go front to back, so drop it
        return value.clone() if out is None else out.copy_(value)


def read_dcp(path: PathLike, *, key: str = "optimizer") -> NamedState:
    """Read a DCP optimizer checkpoint offline (one param tensor in memory at a time)."""
    prefix = f"{key}." if key else ""
    entries, groups = _describe(path, prefix)
    steps_wanted = {f"{prefix}state.{fqn}.step": torch.tensor(0.0) for fqn, e in entries.items() if "step" in e}
    steps = load_values(path, steps_wanted) if steps_wanted else {}
    params, weights = {}, {}
    where = f"{os.fspath(path)}/.metadata"
    for fqn, e in entries.items():
        shape = e[SHAPE_KEY].size if SHAPE_KEY in e else torch.Size([-1])
        tensors = {k: StateTensor(md.size.numel(), md.properties.dtype,
                                  (Piece(0, md.size.numel(), _DCPTensor(path, f"{prefix}state.{fqn}.{k}", md)),), where)
                   for k, md in e.items() if k in MOMENT_KEYS}
        step_key = f"{prefix}state.{fqn}.step"
        params[fqn] = ParamState(fqn, shape, int(steps[step_key].item()) if step_key in steps else None, tensors, where)
        if MASTER_KEY in e:
            md = e[MASTER_KEY]
            weights[fqn] = StateTensor(md.size.numel(), md.properties.dtype, (Piece(
                0, md.size.numel(), _DCPTensor(path, f"{prefix}state.{fqn}.master_param", md)),), where)
    state = NamedState(params, groups, where, weights, {"masters": bool(weights)})
    check_complete(state)
    return state


def write_dcp(state: NamedState, dst: PathLike, *, key: str = "optimizer") -> None:
    """Write a DCP checkpoint offline from any reader's state, one param tensor at a time."""
    check_complete(state)
    out: dict[str, dict[str, Any]] = {}
    for name, p in state.params.items():
        entry: dict[str, Any] = {"step": torch.tensor(float(p.step))}
        sources = dict(p.tensors)
        if state.extra.get("masters") and name in state.weights:
            sources[MASTER_KEY] = state.weights[name]
        for k, t in sources.items():
            entry[k] = FlatChunks(p.shape, lambda a, b, t=t: t.read(a, b, torch.empty(b - a)), 0, torch.float32)
        out[name] = entry
    groups = [{**g, "params": list(g["params"])} for g in state.groups]
    sd = _with_flat_groups({"state": out, "param_groups": groups})
    needed = sum(p.shape.numel() * 4 * (len(out[n]) - 1) for n, p in state.params.items())  # all but the steps
    with staged_dir(Path(dst), needed=needed) as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            dcp.save({key: sd} if key else sd, storage_writer=storage_writer(tmp), no_dist=True, planner=SavePlanner())
        except CheckpointException as exc:  # a BaseException; what failed underneath is an OSError on a full disk
            raise _first_failure(exc) from exc


def _first_failure(exc: CheckpointException) -> BaseException:
    for failure in exc.failures.values():
        return failure[0] if isinstance(failure, tuple) else failure
    return RuntimeError(str(exc))

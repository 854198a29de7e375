"""Gathered, torch-compatible optimizer state dicts: build one from the shards, apply one to them.

[Note: state dict layout]
``state_dict()`` returns exactly ``torch.optim.Adam``'s layout, with full per-param tensors
(padding stripped): ``{"state": {i: {"step", "exp_avg", "exp_avg_sq", ["max_exp_avg_sq"],
["master_param"]}}, "param_groups": [...]}``. ``i`` counts params across groups in order;
a param that never stepped has no entry (as in torch). ``master_param`` (fp32) exists only
for fp16/bf16 params, so no precision is lost to the model dtype; torch's loader keeps it
as an unused extra key. Groups carry torch's implementation keys (``fused`` etc.) so that
``torch.optim.Adam(...).load_state_dict(ours)`` runs the same fused math. The top-level
``"sharded_fused_adam"`` entry holds the loss-scaler state and is ignored by torch.
Because every tensor is a whole param, the dict loads at any world size, and
``load_state_dict`` needs no communication: each rank copies out the slices it owns.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import torch

from .validation import check_hyperparameters

if TYPE_CHECKING:
    from .optimizer import ShardedFusedAdam

__all__ = ["gather_state_dict", "apply_state_dict", "save_full", "load_full", "STATE_KEYS", "FORMAT_VERSION"]

FORMAT_VERSION = 1
STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master_param")
_TORCH_IMPLEMENTATION_KEYS = ("foreach", "capturable", "differentiable", "fused")


def _shard_fields(bucket) -> dict[str, torch.Tensor]:
    fields = {"exp_avg": bucket.exp_avg, "exp_avg_sq": bucket.exp_avg_sq}
    if bucket.max_exp_avg_sq is not None:
        fields["max_exp_avg_sq"] = bucket.max_exp_avg_sq
    if bucket.is_low_precision:
        fields["master_param"] = bucket.master
    return fields


def _saved_groups(opt: ShardedFusedAdam) -> list[dict]:
    groups, start = [], 0
    fused = True if opt._kernel.name == "torch_fused" else None
    for group in opt.param_groups:
        saved = {k: copy.deepcopy(v) for k, v in group.items() if k != "params"}
        saved.update(maximize=False, foreach=None, capturable=False, differentiable=False, fused=fused)
        saved["params"] = list(range(start, start + len(group["params"])))
        start += len(group["params"])
        groups.append(saved)
    return groups


@torch.no_grad()
def gather_state_dict(opt: ShardedFusedAdam, *, rank0_only: bool, offload_to_cpu: bool) -> dict:
    """Assemble the full state dict from every rank's shards (see [Note: state dict layout]).

    A collective. Buckets are gathered one state tensor at a time, so the memory needed
    beyond the returned dict is one bucket's worth of one tensor.
    """
    keep = not rank0_only or opt.rank == 0
    state: dict[int, dict[str, Any]] = {}
    for bucket in opt._buckets:
        stepped = [(slot, s) for slot, s in enumerate(bucket.layout.slots) if bucket.steps[slot] > 0]
        for slot, s in stepped:
            if keep:
                state[s.index] = {"step": torch.tensor(float(bucket.steps[slot]), dtype=torch.float32)}
        if not stepped:
            continue
        for key, shard in _shard_fields(bucket).items():
            full = torch.zeros(bucket.layout.padded_numel, dtype=shard.dtype, device=shard.device)
            start, end = bucket.layout.shard_range(opt.rank)
            full.narrow(0, start, end - start).copy_(shard)
            opt._plan.gather(full, f"{key} of bucket {opt._buckets.index(bucket)} for state_dict()").wait()
            if not keep:
                continue
            for slot, s in stepped:
                value = full.narrow(0, s.offset, s.numel).view(bucket.params[slot].shape)
                state[s.index][key] = value.to("cpu", copy=True) if offload_to_cpu else value.clone()
    if not keep:
        return {}
    return {
        "state": dict(sorted(state.items())),
        "param_groups": _saved_groups(opt),
        "sharded_fused_adam": {"version": FORMAT_VERSION, "world_size": opt.world_size,
                               "loss_scaler": opt._loss_scaler.state_dict()},
    }


def _new_groups(opt: ShardedFusedAdam, saved_groups: list[dict]) -> list[dict]:
    """Our param groups with the saved hyperparameters, validated; raises before changing anything."""
    ours = opt.param_groups
    if len(saved_groups) != len(ours):
        raise ValueError(f"state dict has {len(saved_groups)} param groups, the optimizer has {len(ours)}")
    new = []
    for gi, (group, saved) in enumerate(zip(ours, saved_groups)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"param group {gi} of the state dict has {len(saved['params'])} params, "
                             f"the optimizer's has {len(group['params'])}")
        if saved.get("maximize", False):
            raise ValueError(f"param group {gi} has maximize=True, which ShardedFusedAdam does not support")
        merged = {k: copy.deepcopy(v) for k, v in saved.items()
                  if k not in ("params", *_TORCH_IMPLEMENTATION_KEYS, "maximize")}
        merged.setdefault("decoupled_weight_decay", group["decoupled_weight_decay"])
        merged["params"] = group["params"]
        if "param_names" in group and "param_names" not in merged:
            merged["param_names"] = group["param_names"]
        check_hyperparameters(merged, f"param group {gi} of the state dict")
        new.append(merged)
    return new


def _check_state(opt: ShardedFusedAdam, state: dict) -> None:
    shapes = {s.index: b.params[slot].shape for b in opt._buckets for slot, s in enumerate(b.layout.slots)}
    for index, entry in state.items():
        if not isinstance(index, int) or index not in shapes:
            raise ValueError(f"state dict has state for param {index!r}, but the optimizer has params "
                             f"0..{len(shapes) - 1}")
        for key in ("exp_avg", "exp_avg_sq"):
            if key not in entry:
                raise ValueError(f"state of param {index} has no {key!r}")
        for key in STATE_KEYS:
            value = entry.get(key)
            if value is not None and tuple(value.shape) != tuple(shapes[index]):
                raise ValueError(f"state of param {index}: {key} has shape {tuple(value.shape)}, the param "
                                 f"has shape {tuple(shapes[index])} (a state dict from a different model?)")


@torch.no_grad()
def apply_state_dict(opt: ShardedFusedAdam, state_dict: dict) -> None:
    """Load a torch.optim.Adam/AdamW-layout state dict into this rank's shards.

    Everything is validated first; on error nothing has changed.

    Raises:
        ValueError: a different number of groups or params, an unknown param index, a
            shape that differs, a missing moment, or an unsupported or invalid hyperparameter.
    """
    for key in ("state", "param_groups"):
        if key not in state_dict:
            raise ValueError(f"not an optimizer state dict: no {key!r} key (keys: {sorted(state_dict)})")
    new_groups = _new_groups(opt, state_dict["param_groups"])
    saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    ours_ids = range(sum(len(g["params"]) for g in opt.param_groups))
    remap = dict(zip(saved_ids, ours_ids))  # torch allows any integer ids, in group order
    state = {remap.get(k, k): v for k, v in state_dict["state"].items()}
    _check_state(opt, state)
    opt.param_groups[:] = new_groups
    for bucket in opt._buckets:
        _apply_to_bucket(opt, bucket, state)
    extra = state_dict.get("sharded_fused_adam", {})
    if "loss_scaler" in extra:
        opt._loss_scaler.load_state_dict(extra["loss_scaler"])
    opt._stats = {}


def _apply_to_bucket(opt: ShardedFusedAdam, bucket, state: dict) -> None:
    slots = bucket.layout.slots
    bucket.steps = [int(float(state.get(s.index, {}).get("step", 0))) for s in slots]
    if any("max_exp_avg_sq" in state.get(s.index, {}) for s in slots):
        bucket.ensure_amsgrad_buffer()
    targets = _shard_fields(bucket)
    for name, shard in targets.items():
        if name == "master_param":  # params that come without a saved master keep their own values
            shard.copy_(bucket.buffer.shard(opt.rank))
        else:
            shard.zero_()
    for frag in bucket.fragments:
        entry = state.get(frag.index, {})
        for name, shard in targets.items():
            value = entry.get(name)
            if value is not None:
                piece = value.detach().reshape(-1)[frag.param_start:frag.param_end]
                shard.narrow(0, frag.shard_offset, frag.numel).copy_(piece)


def save_full(opt: ShardedFusedAdam, path: Union[str, os.PathLike]) -> None:
    """Gather the state dict to rank 0 and write it with ``torch.save``, atomically; a collective.

    The file is written under a temporary name, flushed to disk and renamed over ``path``,
    so a save killed midway leaves the previous file intact.
    """
    state = opt.state_dict(rank0_only=True, offload_to_cpu=True)
    if opt.rank == 0:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    opt._plan.barrier(opt.device, "barrier after save_full")


def load_full(opt: ShardedFusedAdam, path: Union[str, os.PathLike]) -> None:
    """Load a file written by ``save_full`` or ``torch.save(torch_optimizer.state_dict())``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a loadable state dict or does not fit this optimizer.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no optimizer checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError) as exc:
        raise ValueError(f"{path} is not a readable optimizer checkpoint (truncated or corrupt?): {exc}") from exc
    opt.load_state_dict(state)

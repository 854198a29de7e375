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
from typing import Any, Callable, Optional, Protocol, Union

import torch

from .files import CheckpointError, CheckpointFileMissing, CheckpointWriteError, check_version, crash_point, crc32_of
from .lock import one_save_at_a_time
from .outputs import write_torch_file
from ..comm.plans import CommPlan
from ..comm.failures import CollectiveError, store_rendezvous
from .staging import StagedLoad
from .state_view import ShardState
from ..kernels.rule import ADAM, TORCH_IMPLEMENTATION_FLAGS, check_hyperparameters

__all__ = [
    "HasShardState",
    "gather_state_dict",
    "apply_state_dict",
    "saved_groups",
    "merged_groups",
    "check_state_fits",
    "require_every_rank",
    "StateDictCalls",
    "save_full",
    "load_full",
    "FORMAT_VERSION",
]

FORMAT_VERSION = 1


class HasShardState(Protocol):
    """Anything that exposes its shards the way ``ShardedFusedAdam`` does."""

    def shard_state(self) -> ShardState: ...


def require_every_rank(what: str, plan: CommPlan, call: int, timeout_s: float) -> None:
    """Wait (bounded) until every rank reached its ``call``-th ``what``; a gathered state needs them all.

    Raises:
        CollectiveError: some ranks did not arrive within ``timeout_s``; names them and the fix.
    """
    missing = store_rendezvous(f"{what}/{plan.tag}/{call}", plan.rank, plan.world_size, timeout_s)
    if missing:
        raise CollectiveError(
            f"{what} is a collective, but rank(s) {missing} did not call it within {timeout_s:g} s "
            f"(state_dict_timeout; rank {plan.rank} of {plan.world_size} did). Call it on every rank: "
            "`sd = opt.state_dict()` then `if rank == 0: torch.save(sd, path)`; or "
            "`opt.state_dict(rank0_only=True)` on every rank; or `opt.snapshot_state_dict()` on every "
            "rank first, after which one rank may call state_dict() alone.")


class StateDictCalls:
    """Makes every rank's n-th ``state_dict()`` meet the others' (bounded), and keeps a snapshot.

    ``gathered`` returns the snapshot while it is current (its ``version`` is the optimizer's),
    on any single rank and without communicating; otherwise it waits until every rank made
    the same call, then gathers. A call that timed out is not counted, so the next call made
    on every rank matches again.
    """

    def __init__(self, plan: CommPlan, timeout_s: float):
        self._plan, self._timeout_s = plan, timeout_s
        self._calls = 0
        self._snapshot: Optional[tuple[int, dict]] = None
        self._server: Any = None

    def serve(self, owner: Any, buckets: list[Bucket]) -> None:
        """Let one rank alone build the state dict (gloo groups; see [Note: served state dicts])."""
        from .served import served_or_none  # the server thread's module, only where it runs

        self._server = served_or_none(owner, self._plan, buckets, self._timeout_s)

    def gathered(self, version: int, rank0_only: bool, gather: Callable[[Optional[Fill]], dict]) -> dict:
        if self._snapshot is not None and self._snapshot[0] == version:
            return {} if rank0_only and self._plan.rank != 0 else self._snapshot[1]
        if self._server is not None:
            return self._server.state_dict(version, rank0_only, gather)
        self._calls += 1
        try:
            require_every_rank("state_dict()", self._plan, self._calls, self._timeout_s)
        except CollectiveError:
            self._calls -= 1
            raise
        return gather(None)

    def snapshot(self, version: int, gather: Callable[[Optional[Fill]], dict]) -> None:
        self._snapshot = None
        self._snapshot = (version, self.gathered(version, False, gather))


def saved_groups(shards: ShardState) -> list[dict]:
    """The param groups as saved: hyperparameters, torch's implementation keys, param indices."""
    groups, start = [], 0
    fused = True if shards.kernel_name == "torch_fused" else None
    for group in shards.param_groups:
        saved = {k: copy.deepcopy(v) for k, v in group.items() if k != "params"}
        saved.update(foreach=None, capturable=False, differentiable=False, fused=fused)
        saved["params"] = list(range(start, start + len(group["params"])))
        start += len(group["params"])
        groups.append(saved)
    return groups


Fill = Callable[[int, str, torch.Tensor], None]  # (bucket index, state key, padded full tensor)


@torch.no_grad()
def gather_state_dict(shards: ShardState, *, rank0_only: bool, offload_to_cpu: bool,
                      fill: Optional[Fill] = None) -> dict:
    """Assemble the full state dict from every rank's shards (see [Note: state dict layout]).

    A collective, unless ``fill`` brings the other ranks' shards into each full tensor (see
    [Note: served state dicts] in served.py). Buckets are gathered one state tensor at a
    time, so the memory needed beyond the returned dict is one bucket's worth of one tensor.
    """
    keep = not rank0_only or shards.rank == 0
    state: dict[int, dict[str, Any]] = {}
    for b, bucket in enumerate(shards.buckets):
        stepped = [(slot, s) for slot, s in enumerate(bucket.layout.slots) if bucket.steps[slot] > 0]
        for slot, s in stepped:
            if keep:
                state[s.index] = {"step": torch.tensor(float(bucket.steps[slot]), dtype=torch.float32)}
        if not stepped:
            continue
        for key, shard in bucket.state_shards().items():
            full = torch.zeros(bucket.layout.padded_numel, dtype=shard.dtype, device=shard.device)
            start, end = bucket.layout.shard_range(shards.rank)
            full.narrow(0, start, end - start).copy_(shard)
            if fill is None:
                shards.plan.gather(full, f"{key} of bucket {b} for state_dict()").wait()
            else:
                fill(b, key, full)
            if not keep:
                continue
            for slot, s in stepped:
                value = full.narrow(0, s.offset, s.numel).view(bucket.params[slot].shape)
                state[s.index][key] = value.to("cpu", copy=True) if offload_to_cpu else value.clone()
    if not keep:
        return {}
    return {
        "state": dict(sorted(state.items())),
        "param_groups": saved_groups(shards),
        "sharded_fused_adam": {"version": FORMAT_VERSION, "world_size": shards.world_size,
                               "loss_scaler": shards.loss_scaler.state_dict()},
    }


def merged_groups(shards: ShardState, saved: list[dict]) -> list[dict]:
    """Our param groups with the saved hyperparameters, validated; raises before changing anything.

    Raises:
        ValueError: a different number of groups or params, or an invalid hyperparameter.
    """
    ours = shards.param_groups
    if len(saved) != len(ours):
        raise ValueError(f"state dict has {len(saved)} param groups, the optimizer has {len(ours)}")
    new = []
    for gi, (group, saved_group) in enumerate(zip(ours, saved)):
        if len(saved_group["params"]) != len(group["params"]):
            raise ValueError(f"param group {gi} of the state dict has {len(saved_group['params'])} params, "
                             f"the optimizer's has {len(group['params'])}")
        merged = {k: copy.deepcopy(v) for k, v in saved_group.items()
                  if k not in ("params", *TORCH_IMPLEMENTATION_FLAGS)}
        merged.setdefault("decoupled_weight_decay", group["decoupled_weight_decay"])
        merged.setdefault("maximize", False)  # torch's default for dicts saved before it existed
        merged.update({k: group[k] for k in TORCH_IMPLEMENTATION_FLAGS if k in group})  # ours, not the file's
        merged["params"] = group["params"]
        if "param_names" in group and "param_names" not in merged:
            merged["param_names"] = group["param_names"]
        check_hyperparameters(merged, f"param group {gi} of the state dict")
        new.append(merged)
    return new


def check_state_fits(shards: ShardState, state: dict) -> None:
    """Check per-param entries (``{index: {key: tensor-like}}``) against the model's params.

    Raises:
        ValueError: an unknown param index, a missing moment or a shape that differs.
    """
    shapes = shards.param_shapes()
    for index, entry in state.items():
        if not isinstance(index, int) or index not in shapes:
            raise ValueError(f"state dict has state for param {index!r}, but the optimizer has params "
                             f"0..{len(shapes) - 1}")
        for key in ADAM.moment_keys:
            if key not in entry:
                raise ValueError(f"state of param {index} has no {key!r}")
        for key in ADAM.checkpoint_keys:
            value = entry.get(key)
            if value is not None and tuple(value.shape) != tuple(shapes[index]):
                raise ValueError(f"state of param {index}: {key} has shape {tuple(value.shape)}, the param "
                                 f"has shape {tuple(shapes[index])} (a state dict from a different model?)")


@torch.no_grad()
def apply_state_dict(shards: ShardState, state_dict: dict) -> None:
    """Load a torch.optim.Adam/AdamW-layout state dict into this rank's shards.

    Everything is validated first; on error nothing has changed.

    Raises:
        ValueError: a different number of groups or params, an unknown param index, a
            shape that differs, a missing moment, or an unsupported or invalid hyperparameter.
        CheckpointError: a ``sharded_fused_adam.version`` this code does not read.
    """
    for key in ("state", "param_groups"):
        if key not in state_dict:
            raise ValueError(f"not an optimizer state dict: no {key!r} key (keys: {sorted(state_dict)})")
    check_version("the state dict", state_dict.get("sharded_fused_adam"), FORMAT_VERSION)
    new_groups = merged_groups(shards, state_dict["param_groups"])
    saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    remap = dict(zip(saved_ids, range(shards.num_params)))  # torch allows any integer ids, in group order
    state = {remap.get(k, k): v for k, v in state_dict["state"].items()}
    check_state_fits(shards, state)

    def read(key: str, index: int, start: int, end: int, out: torch.Tensor) -> bool:
        value = state.get(index, {}).get(key)
        if value is None:
            return False
        out.copy_(value.detach().reshape(-1)[start:end])
        return True

    staging = StagedLoad(shards)  # see [Note: staged load]
    staging.fill(read)
    staging.commit(new_groups, lambda i: int(float(state.get(i, {}).get("step", 0))),
                   state_dict.get("sharded_fused_adam", {}).get("loss_scaler"))


def _state_crcs(state: dict) -> dict:
    """CRC-32 of every state tensor's bytes, ``{param index: {key: crc}}`` (``step`` included)."""
    return {i: {k: crc32_of(v) for k, v in entry.items()} for i, entry in state["state"].items()}


def save_full(opt: HasShardState, path: Union[str, os.PathLike]) -> None:
    """Gather the state dict to rank 0 and write it with ``torch.save``, atomically; a collective.

    The file is written under a temporary name, flushed to disk and renamed over ``path``,
    so a save killed midway leaves the previous file intact (its steps are
    ``checkpoint_files.SAVE_FULL_STEPS``; the temporary files of killed saves are removed
    by the next one). ``state["sharded_fused_adam"]["crc32"]`` holds the CRC-32 of every
    state tensor, which ``load_full`` checks; torch ignores it.

    Raises:
        CheckpointWriteError: on every rank, when rank 0 could not write the file (a full
            disk: rank 0's message names the path and the bytes needed); the previous file is intact.
        CheckpointLockedError: another thread of this process is saving to ``path`` now.
    """
    shards = opt.shard_state()
    with one_save_at_a_time(Path(path), "save_full"):
        state = gather_state_dict(shards, rank0_only=True, offload_to_cpu=True)
        error = None
        if shards.rank == 0:
            crash_point("gathered", 0)
            state["sharded_fused_adam"]["crc32"] = _state_crcs(state)
            try:
                write_torch_file(Path(path), state)  # see [Note: checkpoint outputs]
                crash_point("replaced", 0)
            except CheckpointError as exc:
                error = exc
        failed = shards.plan.any_rank(error is not None, shards.device, "barrier after save_full")
    if failed:  # every rank raises: rank 0 the cause, the others that it failed
        raise error or CheckpointWriteError(f"rank 0 could not write {path} (its error says why); the previous "
                                            "file is intact")


def _verify_crcs(path: Path, state: dict) -> None:
    saved = state.get("sharded_fused_adam", {}).get("crc32")
    if saved is None:
        return  # written by torch or an older version: nothing to check against
    entries = state.get("state", {})
    if set(saved) != set(entries):
        raise CheckpointError(f"{path}: field 'state' holds params {sorted(entries)}, but the checksums were "
                              f"written for params {sorted(saved)}")
    for i, crcs in saved.items():
        for key, crc in crcs.items():
            value = entries[i].get(key)
            if not isinstance(value, torch.Tensor) or crc32_of(value) != int(crc):  # convert --to torch: tensors
                raise CheckpointError(f"{path} is corrupt: field state[{i}][{key!r}] does not match its CRC-32")


def load_full(opt: Any, path: Union[str, os.PathLike], *, verify: bool = True) -> None:
    """Load a file written by ``save_full`` or ``torch.save(torch_optimizer.state_dict())``.

    Args:
        opt: the optimizer to load into (ours, or any ``torch.optim`` optimizer).
        path: the file.
        verify: check the per-tensor CRC-32s that ``save_full`` wrote.

    Raises:
        CheckpointFileMissing: ``path`` does not exist (a FileNotFoundError).
        CheckpointError: the file is unreadable, corrupt, or does not fit this optimizer
            (a ValueError; nothing changed).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointFileMissing(f"no optimizer checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, pickle errors...
        raise CheckpointError(f"{path} is not a readable optimizer checkpoint (truncated or corrupt?): {exc}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not an optimizer state dict")
    check_version(path, state.get("sharded_fused_adam"), FORMAT_VERSION)
    if verify:
        _verify_crcs(path, state)
    try:
        opt.load_state_dict(state)
    except CheckpointError:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: {exc}") from exc

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

from ..core.bucket import STATE_KEYS, Bucket
from .files import CheckpointError, CheckpointFileMissing, ChecksumFile, crash_point, crc32_of, fsync_dir
from ..comm.plans import CommPlan
from ..comm.failures import CollectiveError, store_rendezvous
from .state_view import ShardState
from ..core.validation import check_hyperparameters

__all__ = [
    "HasShardState",
    "gather_state_dict",
    "apply_state_dict",
    "saved_groups",
    "merged_groups",
    "check_state_fits",
    "assemble_shard",
    "require_every_rank",
    "StateDictCalls",
    "save_full",
    "load_full",
    "STATE_KEYS",
    "FORMAT_VERSION",
]

FORMAT_VERSION = 1
_TORCH_IMPLEMENTATION_KEYS = ("foreach", "capturable", "differentiable", "fused")


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
                  if k not in ("params", *_TORCH_IMPLEMENTATION_KEYS)}
        merged.setdefault("decoupled_weight_decay", group["decoupled_weight_decay"])
        merged.setdefault("maximize", False)  # torch's default for dicts saved before it existed
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
        for key in ("exp_avg", "exp_avg_sq"):
            if key not in entry:
                raise ValueError(f"state of param {index} has no {key!r}")
        for key in STATE_KEYS:
            value = entry.get(key)
            if value is not None and tuple(value.shape) != tuple(shapes[index]):
                raise ValueError(f"state of param {index}: {key} has shape {tuple(value.shape)}, the param "
                                 f"has shape {tuple(shapes[index])} (a state dict from a different model?)")


PieceReader = Callable[[int, int, int, torch.Tensor], bool]


def assemble_shard(bucket: Bucket, like: torch.Tensor, read: PieceReader) -> Optional[torch.Tensor]:
    """This rank's shard of one state tensor, built on the CPU from per-param pieces.

    ``read(param_index, start, end, out)`` fills ``out`` with elements ``[start, end)`` of
    that param's flattened saved tensor and returns False if the param has none. Returns
    None if no param of the bucket had one (the caller then keeps the default).
    """
    staged = torch.zeros(like.shape, dtype=like.dtype)
    found = False
    for frag in bucket.fragments:
        found |= read(frag.index, frag.param_start, frag.param_end, staged.narrow(0, frag.shard_offset, frag.numel))
    return staged if found else None


@torch.no_grad()
def apply_state_dict(shards: ShardState, state_dict: dict) -> None:
    """Load a torch.optim.Adam/AdamW-layout state dict into this rank's shards.

    Everything is validated first; on error nothing has changed.

    Raises:
        ValueError: a different number of groups or params, an unknown param index, a
            shape that differs, a missing moment, or an unsupported or invalid hyperparameter.
    """
    for key in ("state", "param_groups"):
        if key not in state_dict:
            raise ValueError(f"not an optimizer state dict: no {key!r} key (keys: {sorted(state_dict)})")
    new_groups = merged_groups(shards, state_dict["param_groups"])
    saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    remap = dict(zip(saved_ids, range(shards.num_params)))  # torch allows any integer ids, in group order
    state = {remap.get(k, k): v for k, v in state_dict["state"].items()}
    check_state_fits(shards, state)

    def reader(key: str) -> PieceReader:
        def read(index: int, start: int, end: int, out: torch.Tensor) -> bool:
            value = state.get(index, {}).get(key)
            if value is None:
                return False
            out.copy_(value.detach().reshape(-1)[start:end])
            return True
        return read

    staged = []
    for bucket in shards.buckets:
        keys = [k for k in STATE_KEYS if any(k in state.get(s.index, {}) for s in bucket.layout.slots)]
        pieces = {k: assemble_shard(bucket, bucket.state_template(k), reader(k)) for k in keys}
        steps = [int(float(state.get(s.index, {}).get("step", 0))) for s in bucket.layout.slots]
        staged.append((steps, {k: v for k, v in pieces.items() if v is not None}))
    shards.param_groups[:] = new_groups
    for bucket, (steps, pieces) in zip(shards.buckets, staged):
        bucket.load_state(steps, pieces)
    extra = state_dict.get("sharded_fused_adam", {})
    if "loss_scaler" in extra:
        shards.loss_scaler.load_state_dict(extra["loss_scaler"])


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
    """
    shards = opt.shard_state()
    state = gather_state_dict(shards, rank0_only=True, offload_to_cpu=True)
    if shards.rank == 0:
        crash_point("gathered", 0)
        path = Path(path)
        state["sharded_fused_adam"]["crc32"] = _state_crcs(state)
        for stale in path.parent.glob(f".{path.name}.tmp*"):  # debris of killed saves
            stale.unlink(missing_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        with ChecksumFile(tmp, partial_step=("tmp_partial", 0)) as f:
            torch.save(state, f)
        crash_point("tmp_written", 0)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        crash_point("replaced", 0)
    shards.plan.barrier(shards.device, "barrier after save_full")


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
            if not isinstance(value, torch.Tensor) or crc32_of(value) != crc:
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
    if verify:
        _verify_crcs(path, state)
    try:
        opt.load_state_dict(state)
    except CheckpointError:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: {exc}") from exc

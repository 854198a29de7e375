"""Sharded checkpoints: each rank writes only its shards; any world size reads only the bytes it needs.

[Note: sharded checkpoint format]
A checkpoint directory holds committed versions, a pointer and a lock::

    path/LOCK                      the job that owns the directory (see [Note: checkpoint directory lock])
    path/LATEST                    "v00000007": the newest committed version (replaced atomically)
    path/v00000007/metadata.json   world size, each param's shape and step, size and CRC-32 of every file
    path/v00000007/common.pt       param groups and loss-scaler state (torch.save, weights only)
    path/v00000007/rankNNNNN.bin   that rank's state shards, raw little-endian bytes, in chunks
    path/v00000007/rankNNNNN.json  the chunks ([byte offset, nbytes, crc32]), the steps of the
                                   params it holds, and where each param piece lies:
                                   [param index, key, dtype, param start, param end, byte offset]

A save takes the lock, clears debris, writes ``vK.tmp/`` on every rank, waits for all of
them, then rank 0 writes the metadata and renames the folder to ``vK`` (the commit: see
[Note: checkpoint commit point]) before updating ``LATEST`` and pruning old versions; the
steps are ``checkpoint_files.SAVE_STEPS``. A load opens the newest committed version,
checks every file against the metadata and the model (see [Note: sharded checkpoint
integrity]), maps this rank's fragments (at the current world size) onto the saved pieces
and reads just those byte ranges. All ranks must see the same filesystem. We do not use
torch.distributed.checkpoint: our shards are uneven 1-D ranges of flattened params, which
DTensor placements cannot express.

[Note: one replica writes]
With hybrid sharding every replica holds the same shards, so only replica 0 (replicate rank
0) writes; the checkpoint is that of a ``shard_size``-rank job and loads at any other
topology. The other replicas wait for replica 0's outcome (one broadcast across the
replicate group) and raise if it failed. Model-parallel peers hold different params, so
each must save into a directory of its own: the paths are compared across the
model-parallel group first, and a shared one is an error on every rank.
"""
from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import Optional, Union

import torch

from ..kernels.rule import ADAM
from .gathered import (FORMAT_VERSION, HasShardState, check_state_fits, merged_groups,
                         saved_groups)
from .files import (SAVE_STEPS, CheckpointError, CheckpointFileMissing, CheckpointWriteError,
                    crash_point, fsync_dir, recover, version_name, write_atomic)
from .lock import CheckpointLockedError, acquire, one_save_at_a_time
from .outputs import check_space, write_failure
from .reader import CheckpointReader
from .staging import StagedLoad
from .writer import RankFile, write_common, write_metadata
from .state_view import ShardState

__all__ = ["save_sharded", "load_sharded", "consolidate_sharded", "CheckpointError", "CheckpointFileMissing",
           "CheckpointLockedError", "CheckpointWriteError", "CheckpointReader", "SAVE_STEPS"]

PathLike = Union[str, os.PathLike]
_LOCKED = -1  # broadcast instead of a version number when rank 0 could not take the lock
_NOT_COMMITTED, _COMMITTED_WITHOUT_LATEST = 1, 2  # rank 0's commit outcome, broadcast (0: done)


@torch.no_grad()
def save_sharded(opt: HasShardState, path: PathLike, *, keep_last: int = 1) -> Path:
    """Write this rank's shards as a new version under ``path``; a collective.

    Args:
        opt: the optimizer to save.
        path: the checkpoint directory (on a filesystem every rank sees).
        keep_last: committed versions to keep, the new one included (>= 1).

    Returns:
        The directory of the new version.

    Raises:
        CheckpointLockedError: another job owns ``path``, or another thread of this process
            is saving into it now (nothing is written).
        CheckpointWriteError: a rank could not write its files (a full disk: the message
            names the path and the bytes needed); on every rank, nothing was committed and
            the previous version is intact. Also raised, naming it, when the new version was
            committed but ``LATEST`` could not be updated.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    path = Path(path)
    with one_save_at_a_time(path, "save_sharded"):
        return _save_on_one_replica(opt.shard_state(), path, keep_last)


def _save_on_one_replica(shards: ShardState, path: Path, keep_last: int) -> Path:
    """Replica 0 saves, the other replicas learn its outcome ([Note: one replica writes])."""
    _check_model_parallel_paths(shards, path)
    replicate = shards.plan.replicate
    if replicate is None:
        return _save(shards, path, keep_last)
    status, final, error = torch.zeros(1, dtype=torch.int64, device=shards.device), None, None
    if replicate.rank == 0:
        try:
            final = _save(shards, path, keep_last)
        except (CheckpointError, OSError) as exc:  # the other replicas must not wait forever
            status[0], error = 1, exc
    replicate.broadcast_(status, what="broadcast of the checkpoint outcome across replicas")
    if error is not None:
        raise error
    if status.item():
        raise CheckpointError(f"replica 0 could not save the checkpoint under {path} (its error names the cause); "
                              "nothing was committed")
    return final if final is not None else path / (path / "LATEST").read_text().strip()


def _check_model_parallel_paths(shards: ShardState, path: Path) -> None:
    """Model-parallel peers must save into different directories ([Note: one replica writes])."""
    peers = shards.plan.model_parallel
    if peers is None:
        return
    paths = peers.all_gather_object(str(path.resolve()), "all-gather of checkpoint paths")
    if len(set(paths)) != len(paths):
        raise ValueError(f"model-parallel ranks save into the same directory {str(path)!r} but hold different "
                         "params: give each its own (e.g. path / f'mp_rank_{mpu.get_model_parallel_rank():02d}')")


def _agree_version(shards: ShardState, path: Path) -> int:
    """Rank 0 takes the lock, clears debris and picks the version; every rank learns it (or rank 0's refusal)."""
    version, refused = 0, None
    if shards.rank == 0:
        try:
            path.mkdir(parents=True, exist_ok=True)
            acquire(path)
            crash_point("locked", 0)
            version = recover(path)
            crash_point("recovered", 0)
        except CheckpointError as exc:  # the other ranks must not wait for a version forever
            version, refused = _LOCKED, exc
        except OSError as exc:
            version, refused = _LOCKED, write_failure(path, exc, 0)
    version_t = torch.tensor([version], dtype=torch.int64, device=shards.device)
    version = int(shards.plan.broadcast_(version_t, what="broadcast of the checkpoint version").item())
    if version == _LOCKED:
        raise refused or CheckpointLockedError(f"checkpoint directory {path} is locked by another job or could not "
                                               "be prepared (rank 0's error names the cause); nothing was written")
    return version


def _save(shards: ShardState, path: Path, keep_last: int) -> Path:
    rank = shards.rank
    version = _agree_version(shards, path)
    tmp = path / f"{version_name(version)}.tmp"
    error, needed = _try_write_rank_files(shards, tmp)
    crash_point("rank_files_written", rank)
    # float32 (every backend reduces it; HCCL refuses fp64): a count of failed ranks, and MiB needed
    outcome = torch.tensor([error is not None, needed / 2**20], dtype=torch.float32, device=shards.device)
    failed, mib = shards.plan.all_reduce_(outcome, what="barrier after writing the shard files").tolist()
    if failed:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise error or CheckpointWriteError(
            f"{failed:.0f} rank(s) could not write their files into {tmp} (their errors say why; the shard files "
            f"of this save need about {mib:.1f} MiB); nothing was committed, the previous version is intact")
    crash_point("all_ranks_written", rank)
    final = path / version_name(version)
    code = _NOT_COMMITTED if rank == 0 else 0
    if rank == 0:
        try:
            _commit(shards, path, tmp, final, keep_last)
            code = 0
        except (CheckpointError, OSError) as exc:
            error = exc if isinstance(exc, CheckpointError) else write_failure(tmp, exc, 0)
            code = _COMMITTED_WITHOUT_LATEST if final.is_dir() else _NOT_COMMITTED
            shutil.rmtree(tmp, ignore_errors=True)
    code_t = torch.tensor([code], dtype=torch.int64, device=shards.device)
    code = int(shards.plan.broadcast_(code_t, what="barrier after committing the checkpoint").item())
    if code == _NOT_COMMITTED:
        raise error or CheckpointWriteError(f"rank 0 could not commit {final} (its error says why); nothing was "
                                            "committed, the previous version is intact")
    if code == _COMMITTED_WITHOUT_LATEST:
        raise CheckpointWriteError(f"{final} was committed and loads, but writing LATEST or pruning old versions "
                                   f"failed afterwards: {error or 'see rank 0'} (the next save repairs LATEST)")
    return final


def _try_write_rank_files(shards: ShardState, tmp: Path) -> tuple[Optional[CheckpointError], int]:
    """Write this rank's files into ``tmp``: (None or the error, the bytes they need)."""
    needed = sum(t.numel() * t.element_size() for b in shards.buckets for t in b.state_shards().values())
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        crash_point("tmp_created", shards.rank)
        check_space(tmp / f"rank{shards.rank:05d}.bin", needed)
        _write_rank_files(shards, tmp)
    except CheckpointError as exc:
        return exc, needed
    except OSError as exc:
        return _rank_write_failure(shards, tmp, exc, needed), needed
    return None, needed


def _rank_write_failure(shards: ShardState, tmp: Path, exc: OSError, needed: int) -> CheckpointError:
    """A failed write, named; on rank 0, a lost lock explains it better (another job deleted our folder)."""
    if shards.rank == 0:
        try:
            acquire(tmp.parent)
        except CheckpointError as lost:
            return lost
    return write_failure(tmp / f"rank{shards.rank:05d}.bin", exc, needed)


def _commit(shards: ShardState, path: Path, tmp: Path, final: Path, keep_last: int) -> None:
    """Rank 0: metadata, the commit rename, LATEST, pruning (see [Note: checkpoint commit point])."""
    common = _write_common(shards, tmp)
    crash_point("common_written", 0)
    _write_metadata(shards, tmp, common)
    fsync_dir(tmp)
    crash_point("metadata_written", 0)
    os.replace(tmp, final)
    fsync_dir(path)
    crash_point("committed", 0)
    write_atomic(path / "LATEST", final.name.encode())
    fsync_dir(path)
    crash_point("latest_written", 0)
    versions = sorted(p for p in path.glob("v*") if p.is_dir() and p.name[1:].isdigit())
    for old in versions[:-keep_last]:
        doomed = old.with_name(old.name + ".del")  # renamed first: a half-deleted folder is never "committed"
        os.replace(old, doomed)
        crash_point("prune_partial", 0)
        shutil.rmtree(doomed, ignore_errors=True)
    crash_point("pruned", 0)


def _write_rank_files(shards: ShardState, folder: Path) -> None:
    steps = {s.index: b.steps[slot] for b in shards.buckets for slot, s in enumerate(b.layout.slots)}
    with RankFile(folder, shards.rank, shards.world_size) as rank_file:
        for b, bucket in enumerate(shards.buckets):
            for key, shard in bucket.state_shards().items():
                rank_file.add(key, shard.to("cpu"), [(f.index, f.param_start, f.param_end, f.shard_offset)
                                                     for f in bucket.fragments])
                if b == 0 and key == ADAM.moment_keys[0]:
                    rank_file.flush()
                    crash_point("rank_file_partial", shards.rank)
        rank_file.close(steps)


def _write_common(shards: ShardState, folder: Path) -> dict:
    return write_common(folder, saved_groups(shards), shards.loss_scaler.state_dict())


def _write_metadata(shards: ShardState, folder: Path, common: dict) -> None:
    steps = {s.index: b.steps[slot] for b in shards.buckets for slot, s in enumerate(b.layout.slots)}
    params = [{"index": index, "shape": list(shape), "step": steps.get(index, 0)}
              for index, shape in shards.param_shapes().items()]
    write_metadata(folder, shards.world_size, params, common)


def _shapes_state(reader: CheckpointReader) -> dict:
    """A stand-in state (shapes only) for the shared model-fit checks of checkpoint.py."""
    state = {}
    for p in reader.meta["params"]:
        if p["step"] > 0:
            fake = torch.empty(p["shape"], device="meta")
            state[p["index"]] = {key: fake for key in ADAM.moment_keys}
    return state


def _check_model(shards: ShardState, reader: CheckpointReader) -> list[dict]:
    """The param groups to install, after checking the checkpoint against the optimizer's model."""
    meta_file = reader.folder / "metadata.json"
    if len(reader.shapes) != shards.num_params:
        raise CheckpointError(f"{meta_file}: field 'params': checkpoint has {len(reader.shapes)} params, "
                              f"the optimizer has {shards.num_params}")
    for index, shape in shards.param_shapes().items():
        if reader.shapes[index] != tuple(shape):
            raise CheckpointError(f"{meta_file}: field params[{index}].shape is {list(reader.shapes[index])}, the "
                                  f"optimizer's param {index} has shape {list(shape)} (a different model?)")
    common_file = reader.folder / "common.pt"
    try:
        new_groups = merged_groups(shards, reader.common["param_groups"])
        check_state_fits(shards, _shapes_state(reader))
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{common_file}: field 'param_groups' does not fit the optimizer: {exc}") from exc
    try:
        copy.deepcopy(shards.loss_scaler).load_state_dict(reader.common["loss_scaler"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{common_file}: field 'loss_scaler' is not a loss-scaler state: {exc}") from exc
    return new_groups


@torch.no_grad()
def load_sharded(opt: HasShardState, path: PathLike, *, verify: bool = True) -> None:
    """Load the newest committed version under ``path`` (saved at any world size); not a collective.

    Everything is read and checked before anything changes: on any error the optimizer
    is exactly as before.

    Args:
        opt: the optimizer to load into.
        path: the checkpoint directory.
        verify: check the CRC-32 of every ``.bin`` chunk read (False skips that, not the
            structural checks; see docs/checkpoints.md for the cost).

    Raises:
        CheckpointFileMissing: no checkpoint, or a file of it is missing (a FileNotFoundError).
        CheckpointError: a truncated, corrupt or inconsistent file, or a checkpoint of a
            different model; the message names the file and the field.
    """
    shards = opt.shard_state()
    reader = CheckpointReader(path, verify=verify)
    new_groups = _check_model(shards, reader)
    staging = StagedLoad(shards)  # see [Note: staged load]
    staging.fill(lambda key, index, start, end, out: reader.read(index, key, start, end, out))
    staging.commit(new_groups, reader.steps.__getitem__, reader.common["loss_scaler"])


def consolidate_sharded(path: PathLike) -> dict:
    """Assemble a sharded checkpoint into one torch.optim.Adam-layout state dict, offline.

    No process group needed; the result loads into ``torch.optim.Adam/AdamW`` or into
    ``ShardedFusedAdam`` at any world size. Every file is verified first.

    Raises:
        CheckpointFileMissing, CheckpointError: as ``load_sharded``.
    """
    reader = CheckpointReader(path)
    reader.verify_all()  # one CRC pass over every chunk; the reads below need not repeat it
    reader.verify = False
    state = {}
    for p in reader.meta["params"]:
        if p["step"] == 0:
            continue
        numel = 1
        for d in p["shape"]:
            numel *= d
        entry = {"step": torch.tensor(float(p["step"]), dtype=torch.float32)}
        for key in ADAM.checkpoint_keys:
            if reader.has(p["index"], key):
                dtype = reader.pieces[(p["index"], key)][0][4]
                full = torch.zeros(numel, dtype=getattr(torch, dtype))
                reader.read(p["index"], key, 0, numel, full)
                entry[key] = full.view(p["shape"])
        state[p["index"]] = entry
    return {"state": state, "param_groups": reader.common["param_groups"],
            "sharded_fused_adam": {"version": FORMAT_VERSION, "world_size": reader.meta["world_size"],
                                   "loss_scaler": reader.common["loss_scaler"]}}

"""Sharded checkpoints: each rank writes only its shards; any world size reads only the bytes it needs.

[Note: sharded checkpoint format]
A checkpoint directory holds versions and a pointer::

    path/LATEST                 "v00000007": the last complete version (replaced atomically)
    path/v00000007/metadata.json   world size, each param's shape and step, the rank files
    path/v00000007/common.pt       param groups and loss-scaler state (torch.save, weights only)
    path/v00000007/rankNNNNN.bin   that rank's state shards, raw little-endian bytes
    path/v00000007/rankNNNNN.json  where each param piece lies in rankNNNNN.bin:
                                   [param index, key, dtype, param start, param end, byte offset]

Saving writes ``vK.tmp/``, waits for every rank, then rank 0 renames it to ``vK`` and
atomically replaces ``LATEST``: a save killed at any point leaves ``LATEST`` naming the
previous complete version (stale ``*.tmp`` folders are removed by the next save). Loading
reads ``LATEST``, checks every file against the metadata, maps this rank's fragments (at
the current world size) onto the saved pieces and reads just those byte ranges. All ranks
must see the same filesystem. We do not use torch.distributed.checkpoint: our shards are
uneven 1-D ranges of flattened params, which DTensor placements cannot express.
"""
from __future__ import annotations

import ctypes
import json
import os
import shutil
from pathlib import Path
from typing import Union

import torch

from .bucket import STATE_KEYS
from .checkpoint import (FORMAT_VERSION, HasShardState, assemble_shard, check_state_fits, merged_groups,
                         saved_groups)
from .shard_state import ShardState

__all__ = ["save_sharded", "load_sharded", "consolidate_sharded", "CheckpointError", "CheckpointReader"]

PathLike = Union[str, os.PathLike]
_FORMAT = "sharded_fused_adam/sharded"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt or belongs to a different model."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _latest_version(path: Path) -> int:
    pointer = path / "LATEST"
    return int(pointer.read_text().strip()[1:]) if pointer.exists() else 0


@torch.no_grad()
def save_sharded(opt: HasShardState, path: PathLike, *, keep_last: int = 1) -> Path:
    """Write this rank's shards as a new version under ``path``; a collective.

    Args:
        opt: the optimizer to save.
        path: the checkpoint directory (on a filesystem every rank sees).
        keep_last: complete versions to keep, the new one included (>= 1).

    Returns:
        The directory of the new version.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    path = Path(path)
    shards = opt.shard_state()
    if shards.rank == 0:
        path.mkdir(parents=True, exist_ok=True)
        for stale in path.glob("v*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
    version_t = torch.tensor([_latest_version(path) + 1 if shards.rank == 0 else 0], device=shards.device)
    version = int(shards.plan.broadcast_(version_t, what="broadcast of the checkpoint version").item())
    tmp = path / f"v{version:08d}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    _write_rank_files(shards, tmp)
    shards.plan.barrier(shards.device, "barrier after writing the shard files")
    final = path / f"v{version:08d}"
    if shards.rank == 0:
        _write_common(shards, tmp)
        os.replace(tmp, final)
        _fsync_dir(path)
        _write_atomic(path / "LATEST", final.name.encode())
        _fsync_dir(path)
        versions = sorted(p for p in path.glob("v*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in versions[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    shards.plan.barrier(shards.device, "barrier after committing the checkpoint")
    return final


def _write_rank_files(shards: ShardState, folder: Path) -> None:
    pieces, offset = [], 0
    name = f"rank{shards.rank:05d}"
    with open(folder / f"{name}.bin", "wb") as f:
        for bucket in shards.buckets:
            for key, shard in bucket.state_shards().items():
                data = shard.detach().to("cpu").contiguous()
                nbytes = data.numel() * data.element_size()
                f.write(ctypes.string_at(data.data_ptr(), nbytes))
                for frag in bucket.fragments:
                    pieces.append([frag.index, key, str(data.dtype).removeprefix("torch."),
                                   frag.param_start, frag.param_end,
                                   offset + frag.shard_offset * data.element_size()])
                offset += nbytes
        f.flush()
        os.fsync(f.fileno())
    _write_atomic(folder / f"{name}.json", json.dumps({"nbytes": offset, "pieces": pieces}).encode())


def _write_common(shards: ShardState, folder: Path) -> None:
    steps = {s.index: b.steps[slot] for b in shards.buckets for slot, s in enumerate(b.layout.slots)}
    params = [{"index": index, "shape": list(shape), "step": steps.get(index, 0)}
              for index, shape in shards.param_shapes().items()]
    meta = {"format": _FORMAT, "version": FORMAT_VERSION, "world_size": shards.world_size,
            "params": params, "files": [f"rank{r:05d}" for r in range(shards.world_size)]}
    _write_atomic(folder / "metadata.json", json.dumps(meta).encode())
    common = {"param_groups": saved_groups(shards), "loss_scaler": shards.loss_scaler.state_dict()}
    torch.save(common, folder / "common.pt")


class CheckpointReader:
    """A checked view of one saved version: metadata, rank indices and byte-range reads."""

    def __init__(self, path: PathLike):
        path = Path(path)
        pointer = path / "LATEST"
        if not pointer.exists():
            raise FileNotFoundError(f"no sharded checkpoint at {path}: {pointer} does not exist")
        self.folder = path / pointer.read_text().strip()
        self.meta = self._json("metadata.json")
        if self.meta.get("format") != _FORMAT:
            raise CheckpointError(f"{self.folder / 'metadata.json'} is not a {_FORMAT} checkpoint")
        common = self.folder / "common.pt"
        if not common.exists():
            raise FileNotFoundError(f"checkpoint file {common} is missing")
        self.common = torch.load(common, weights_only=True)
        self.pieces: dict[tuple[int, str], list[tuple[int, int, str, int, str]]] = {}
        for name in self.meta["files"]:
            index = self._json(f"{name}.json")
            binary = self.folder / f"{name}.bin"
            if not binary.exists():
                raise FileNotFoundError(f"checkpoint file {binary} is missing")
            size = binary.stat().st_size
            if size != index["nbytes"]:
                raise CheckpointError(f"checkpoint file {binary} is truncated or corrupt: "
                                      f"{size} bytes, expected {index['nbytes']}")
            for param, key, dtype, start, end, offset in index["pieces"]:
                self.pieces.setdefault((param, key), []).append((start, end, str(binary), offset, dtype))

    def _json(self, name: str) -> dict:
        file = self.folder / name
        if not file.exists():
            raise FileNotFoundError(f"checkpoint file {file} is missing")
        try:
            return json.loads(file.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"checkpoint file {file} is corrupt: {exc}") from exc

    def has(self, index: int, key: str) -> bool:
        return (index, key) in self.pieces

    def read(self, index: int, key: str, start: int, end: int, out: torch.Tensor) -> bool:
        """Fill ``out`` with elements ``[start, end)`` of the flattened ``key`` state of param
        ``index``; False (and ``out`` untouched) if the checkpoint has no such state."""
        if (index, key) not in self.pieces:
            return False
        for p_start, p_end, file, offset, dtype in self.pieces[(index, key)]:
            lo, hi = max(start, p_start), min(end, p_end)
            if lo >= hi:
                continue
            item = torch.empty((), dtype=getattr(torch, dtype)).element_size()
            with open(file, "rb") as f:
                f.seek(offset + (lo - p_start) * item)
                raw = bytearray(f.read((hi - lo) * item))
            out.narrow(0, lo - start, hi - lo).copy_(torch.frombuffer(raw, dtype=getattr(torch, dtype)))
        return True


def _shapes_state(reader: CheckpointReader) -> dict:
    """A stand-in state (shapes only) for the shared model-fit checks of checkpoint.py."""
    state = {}
    for p in reader.meta["params"]:
        if p["step"] > 0:
            fake = torch.empty(p["shape"], device="meta")
            state[p["index"]] = {"exp_avg": fake, "exp_avg_sq": fake}
    return state


@torch.no_grad()
def load_sharded(opt: HasShardState, path: PathLike) -> None:
    """Load the latest version under ``path`` (saved at any world size); not a collective.

    Raises:
        FileNotFoundError: no checkpoint, or a file of it is missing.
        CheckpointError: a truncated/corrupt file or a checkpoint of a different model
            (nothing is changed then).
    """
    shards = opt.shard_state()
    reader = CheckpointReader(path)
    if len(reader.meta["params"]) != shards.num_params:
        raise CheckpointError(f"checkpoint has {len(reader.meta['params'])} params, "
                              f"the optimizer has {shards.num_params}")
    try:
        new_groups = merged_groups(shards, reader.common["param_groups"])
        check_state_fits(shards, _shapes_state(reader))
    except ValueError as exc:
        raise CheckpointError(f"{reader.folder}: {exc}") from exc
    steps = {p["index"]: p["step"] for p in reader.meta["params"]}
    staged = []
    for bucket in shards.buckets:
        pieces = {}
        for key in STATE_KEYS:
            piece = assemble_shard(bucket, bucket.state_template(key),
                                   lambda i, a, b, out, key=key: reader.read(i, key, a, b, out))
            if piece is not None:
                pieces[key] = piece
        staged.append(([steps[s.index] for s in bucket.layout.slots], pieces))
    shards.param_groups[:] = new_groups
    for bucket, (bucket_steps, pieces) in zip(shards.buckets, staged):
        bucket.load_state(bucket_steps, pieces)
    shards.loss_scaler.load_state_dict(reader.common["loss_scaler"])


def consolidate_sharded(path: PathLike) -> dict:
    """Assemble a sharded checkpoint into one torch.optim.Adam-layout state dict, offline.

    No process group needed; the result loads into ``torch.optim.Adam/AdamW`` or into
    ``ShardedFusedAdam`` at any world size.
    """
    reader = CheckpointReader(path)
    state = {}
    for p in reader.meta["params"]:
        if p["step"] == 0:
            continue
        numel = 1
        for d in p["shape"]:
            numel *= d
        entry = {"step": torch.tensor(float(p["step"]), dtype=torch.float32)}
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master_param"):
            if reader.has(p["index"], key):
                dtype = reader.pieces[(p["index"], key)][0][4]
                full = torch.zeros(numel, dtype=getattr(torch, dtype))
                reader.read(p["index"], key, 0, numel, full)
                entry[key] = full.view(p["shape"])
        state[p["index"]] = entry
    return {"state": state, "param_groups": reader.common["param_groups"],
            "sharded_fused_adam": {"version": FORMAT_VERSION, "world_size": reader.meta["world_size"],
                                   "loss_scaler": reader.common["loss_scaler"]}}

"""The one writer of our sharded format's files; ``reader.py`` is its counterpart.

``save_sharded`` (each rank its live shards) and ``convert.write_ours`` (one rank file of
whole params, streamed from another format) both write a version folder through these
functions, so the format (see [Note: sharded checkpoint format] in reader.py) is spelled in
one place: a rank file is a ``.bin`` of checksummed chunks and a ``.json`` index of the
pieces each chunk holds; ``common.pt`` holds the param groups and the loss scaler;
``metadata.json`` lists the params and cross-checks every other file.
"""
from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from .files import ChecksumFile, write_atomic
from .reader import SHARDED_FORMAT, SHARDED_VERSION, canonical_json

__all__ = ["RankFile", "write_common", "write_metadata"]


def _rank_name(rank: int) -> str:
    return f"rank{rank:05d}"


class RankFile:
    """One rank's ``.bin`` and ``.json`` in a version folder, written chunk by chunk.

    Args:
        folder: the (temporary) version folder.
        rank: the rank whose file this is.
        world_size: ranks the version is saved at.
    """

    def __init__(self, folder: Path, rank: int, world_size: int):
        self.folder, self.rank, self.world_size = folder, rank, world_size
        self._bin = ChecksumFile(folder / f"{_rank_name(rank)}.bin")
        self._chunks: list[list[int]] = []
        self._pieces: list[list[Any]] = []

    def add(self, key: str, data: torch.Tensor, pieces: Iterable[tuple[int, int, int, int]]) -> None:
        """Append ``data`` (1-D, on the CPU) as one checksummed chunk of state tensor ``key``.

        Args:
            key: the state key (the update rule's, or the master's).
            data: the chunk's elements, in the dtype they are saved in.
            pieces: ``(param index, param start, param end, element offset in data)`` of every
                param range the chunk holds.
        """
        data = data.detach().contiguous()
        offset = self._bin.nbytes
        nbytes, crc = self._bin.write_tensor(data)
        self._chunks.append([offset, nbytes, crc])
        dtype = str(data.dtype).removeprefix("torch.")
        for index, start, end, at in pieces:
            self._pieces.append([index, key, dtype, start, end, offset + at * data.element_size()])

    def flush(self) -> None:
        self._bin.flush()

    def close(self, steps: Mapping[int, int]) -> None:
        """Finish the ``.bin`` (flushed, fsynced) and write the index with each param's ``steps``."""
        self._bin.close()
        index = {"format": SHARDED_FORMAT, "version": SHARDED_VERSION, "rank": self.rank,
                 "world_size": self.world_size, "nbytes": self._bin.nbytes, "chunks": self._chunks,
                 "pieces": self._pieces, "steps": sorted([i, s] for i, s in steps.items())}
        write_atomic(self.folder / f"{_rank_name(self.rank)}.json", canonical_json(index))

    def __enter__(self) -> "RankFile":
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is not None:  # the error being raised says why; the file is debris of the version
            self._bin.__exit__(*exc)


def write_common(folder: Path, param_groups: list[dict], loss_scaler: dict) -> dict:
    """Write ``common.pt``; returns its ``{"nbytes", "crc32"}`` for the metadata."""
    with ChecksumFile(folder / "common.pt") as f:
        torch.save({"param_groups": param_groups, "loss_scaler": loss_scaler}, f)
    return {"nbytes": f.nbytes, "crc32": f.crc}


def write_metadata(folder: Path, world_size: int, params: list[dict], common: dict) -> None:
    """Write ``metadata.json`` once every rank file is in ``folder``: it checks them all.

    Args:
        params: ``{"index", "shape", "step"}`` of every param, in order.
        common: what ``write_common`` returned.
    """
    files = []
    for r in range(world_size):
        name = _rank_name(r)
        raw = (folder / f"{name}.json").read_bytes()
        files.append({"name": name, "nbytes": (folder / f"{name}.bin").stat().st_size,
                      "index_crc32": zlib.crc32(raw)})
    meta = {"format": SHARDED_FORMAT, "version": SHARDED_VERSION, "world_size": world_size,
            "params": params, "files": files, "common": common}
    meta["crc32"] = zlib.crc32(canonical_json(meta))
    write_atomic(folder / "metadata.json", canonical_json(meta))

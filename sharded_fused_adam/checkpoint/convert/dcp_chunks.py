"""DCP chunk metadata for our flat 1-D shards, and the two small planner hooks that serve them.

[Note: DCP chunks of flat shards]
DCP describes a rank's part of a tensor as rectangular chunks (per-dim offsets and sizes),
and DTensor placements can only cut whole rows or columns. Our shards are 1-D ranges of
the *flattened* param, which usually start and end mid-row. A contiguous range of a
C-contiguous tensor is, however, always a union of at most ``2 * ndim - 1`` rectangles, each of
them itself contiguous in memory: a partial last-dim run up to a row boundary, whole rows up
to a plane boundary, ..., whole outer slices, then the same in reverse. ``boxes`` computes
them, and ``FlatChunks`` hands them to DCP through its ``__create_write_items__`` /
``__create_chunk_list__`` / ``__get_tensor_shard__`` protocol (the one DTensor implements), so
DCP's own planners and storage layer write, dedupe, validate and reshard them: each rank
writes only the bytes it owns, and on load reads only the chunks overlapping its fragments.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Union

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from .state import CheckpointError

__all__ = ["boxes", "FlatChunks", "SavePlanner", "LoadPlanner", "load_values", "read_metadata", "storage_writer"]

PathLike = Union[str, os.PathLike]
Box = tuple[tuple[int, ...], tuple[int, ...], int]  # offsets, sizes, flat start


def boxes(shape: tuple[int, ...], start: int, end: int) -> list[Box]:
    """The rectangles that make up elements ``[start, end)`` of a flattened ``shape`` (see the note)."""
    shape = tuple(shape)
    if not shape:
        return [((), (), 0)] if start < end else []
    strides = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    out, pos = [], start
    while pos < end:
        k = next(d for d in range(len(shape)) if pos % strides[d] == 0 and strides[d] <= end - pos)
        count = min((end - pos) // strides[k], shape[k] - (pos // strides[k]) % shape[k])
        offsets = tuple((pos // strides[d]) % shape[d] for d in range(len(shape)))
        out.append((offsets, (1,) * k + (count,) + shape[k + 1:], pos))
        pos += count * strides[k]
    return out


class FlatChunks:
    """One rank's part of one saved tensor: ``boxes`` of a flat range, each a view of ``flat``.

    Args:
        shape: the whole tensor's shape.
        flat: this rank's elements ``[start, start + flat.numel())`` of the flattened tensor, or a
            callable ``(start, end) -> tensor`` that reads them when DCP asks (offline writing).
        start: where ``flat`` begins in the flattened tensor.
        dtype: the saved dtype.
    """

    def __init__(self, shape: torch.Size, flat: Union[torch.Tensor, Callable], start: int, dtype: torch.dtype):
        self.shape, self.flat, self.start, self.dtype = torch.Size(shape), flat, start, dtype
        numel = flat.numel() if isinstance(flat, torch.Tensor) else self.shape.numel() - start
        self.boxes = boxes(tuple(self.shape), start, start + numel)

    def size(self) -> torch.Size:
        return self.shape

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(offsets=torch.Size(o), sizes=torch.Size(s)) for o, s, _ in self.boxes]

    def __create_write_items__(self, fqn: str, obj: Any) -> list[WriteItem]:
        return [WriteItem(index=MetadataIndex(fqn, torch.Size(o), i), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=chunk, properties=TensorProperties(dtype=self.dtype),
                                                      size=self.shape))
                for i, ((o, _, _), chunk) in enumerate(zip(self.boxes, self.__create_chunk_list__()))]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        i = index.index
        if i is None or i >= len(self.boxes) or torch.Size(self.boxes[i][0]) != index.offset:
            i = next(j for j, (o, _, _) in enumerate(self.boxes) if torch.Size(o) == index.offset)
        _, sizes, flat_start = self.boxes[i]
        numel = torch.Size(sizes).numel()
        if isinstance(self.flat, torch.Tensor):
            return self.flat.narrow(0, flat_start - self.start, numel).view(sizes)
        return self.flat(flat_start, flat_start + numel).view(sizes)


class SavePlanner(DefaultSavePlanner):
    """DCP's default planner; only the lookup of a ``FlatChunks`` chunk is ours (DCP's own
    lookup accepts only ``torch.Tensor`` subclasses as chunked objects)."""

    def lookup_object(self, index: MetadataIndex) -> Any:
        obj = self.state_dict.get(index.fqn)
        return obj.__get_tensor_shard__(index) if isinstance(obj, FlatChunks) else super().lookup_object(index)


class LoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, with the same ``FlatChunks`` lookup as ``SavePlanner``.

    Its ``set_up_planner`` runs ``_init_state_dict``, which (torch 2.13) replaces every value
    that is not a tensor, number, string or container by None, so the ``FlatChunks`` of our
    flat top-level keys are set aside across that call and put back.
    """

    def set_up_planner(self, state_dict: dict, metadata: Any = None, is_coordinator: bool = False) -> None:
        chunks = {k: v for k, v in state_dict.items() if isinstance(v, FlatChunks)}
        state_dict.update({k: torch.empty(0) for k in chunks})
        super().set_up_planner(state_dict, metadata, is_coordinator)
        state_dict.update(chunks)
        self.state_dict.update(chunks)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        obj = self.state_dict.get(index.fqn)
        return obj.__get_tensor_shard__(index) if isinstance(obj, FlatChunks) else super().lookup_tensor(index)


def read_metadata(path: PathLike) -> Any:
    try:
        return dcp.FileSystemReader(os.fspath(path)).read_metadata()
    except (FileNotFoundError, OSError) as exc:
        raise CheckpointError(f"{path} is not a readable DCP checkpoint: {exc}") from exc


def load_values(path: PathLike, wanted: dict[str, Any], process_group: Any = None, no_dist: bool = True) -> dict:
    with warnings.catch_warnings():  # offline reads are single-process on purpose: DCP's warning says so
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(wanted, checkpoint_id=os.fspath(path), process_group=process_group, no_dist=no_dist,
                 planner=LoadPlanner())
    return wanted


def storage_writer(path: PathLike) -> dcp.FileSystemWriter:
    """DCP's file writer, one file per chunk, so memory stays at one chunk.

    DCP's ``FileSystemWriter`` (torch 2.13) keeps a reference to every tensor it wrote to a
    file until that file is closed (and clones views first), so with the default one file
    per rank a save would hold a copy of the rank's whole state; one file per write item
    bounds it to one chunk.
    """
    return dcp.FileSystemWriter(os.fspath(path), single_file_per_rank=False, thread_count=1)

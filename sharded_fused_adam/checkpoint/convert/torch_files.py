"""Read and write ``torch.save`` files one tensor range at a time, so converters never hold a whole file.

[Note: streamed torch files]
A ``torch.save`` file is an uncompressed zip: ``<name>/data.pkl`` (the pickled structure, with
each storage replaced by a persistent id ``('storage', type, key, location, numel)``) and one
record ``<name>/data/<key>`` per storage. ``load_lazy`` unpickles the structure only: every
tensor becomes a ``LazyTensor`` that knows its dtype, shape, storage offset and the byte
offset of its storage record, and reads element ranges with ``os.pread``. ``save_streamed``
goes the other way: ``torch.save`` under ``torch.serialization.skip_data`` writes the structure
with uninitialised placeholder tensors (``torch.empty``: no page is touched), then each
placeholder's bytes are filled in place by a callback, piece by piece. Both rely only on
the zip layout and the persistent-id tuple of torch's documented serialization format.
"""
from __future__ import annotations

import os
import pickle
import struct
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Union

import torch

from ..outputs import data_nbytes, pwrite_all, staged_file, torch_save

__all__ = ["LazyTensor", "load_lazy", "save_streamed", "save_small", "data_nbytes", "placeholder", "iter_tensors",
           "Filler"]

PathLike = Union[str, os.PathLike]
Filler = Callable[[int, int], torch.Tensor]  # (start, end) flattened elements -> a tensor of them
_CHUNK_ELEMENTS = 1 << 24  # 64 MiB of fp32 per read or write


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: torch.dtype
    offset: int  # byte offset of the storage record in the file


@dataclass(frozen=True)
class LazyTensor:
    """A tensor of a ``torch.save`` file, not read yet (see [Note: streamed torch files])."""

    path: str
    dtype: torch.dtype
    shape: torch.Size
    byte_offset: int  # where element 0 lies in the file
    contiguous: bool

    def numel(self) -> int:
        return self.shape.numel()

    def read(self, start: int, end: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Elements ``[start, end)`` of the flattened tensor (into ``out`` if given)."""
        if not self.contiguous:
            raise ValueError(f"{self.path}: a non-contiguous saved tensor of shape {tuple(self.shape)} "
                             "cannot be read in pieces")
        if not 0 <= start <= end <= self.numel():
            raise ValueError(f"{self.path}: range [{start}, {end}) outside a tensor of {self.numel()} elements")
        item = torch.empty((), dtype=self.dtype).element_size()
        out = torch.empty(end - start, dtype=self.dtype) if out is None else out
        buf = bytearray((end - start) * item)
        with open(self.path, "rb") as f:
            got = os.preadv(f.fileno(), [buf], self.byte_offset + start * item) if buf else 0
        if got != len(buf):
            raise ValueError(f"{self.path} is truncated: wanted {len(buf)} bytes at {self.byte_offset + start * item}")
        if buf:
            out.copy_(torch.frombuffer(buf, dtype=self.dtype))
        return out

    def load(self) -> torch.Tensor:
        return self.read(0, self.numel()).view(self.shape)


def _record_offsets(path: Path) -> tuple[str, dict[str, int]]:
    try:
        return _zip_records(path)
    except zipfile.BadZipFile as exc:
        raise ValueError(f"{path} is not a torch.save zip file: {exc}") from exc


def _zip_records(path: Path) -> tuple[str, dict[str, int]]:
    with zipfile.ZipFile(path) as zf, open(path, "rb") as raw:
        names = zf.namelist()
        pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            raise ValueError(f"{path} is not a torch.save zip file (no data.pkl)")
        prefix = pkl[: -len("data.pkl")]
        offsets = {}
        for info in zf.infolist():
            if info.filename.startswith(prefix + "data/") and info.compress_type == zipfile.ZIP_STORED:
                raw.seek(info.header_offset + 26)
                name_len, extra_len = struct.unpack("<HH", raw.read(4))
                offsets[info.filename[len(prefix) + 5:]] = info.header_offset + 30 + name_len + extra_len
        return zf.read(pkl), offsets


def _stand_in(name: str) -> type:
    """An inert class for a pickled DeepSpeed object when DeepSpeed is not installed."""
    return type(name, (), {"__setstate__": lambda self, state: self.__dict__.update(
        state if isinstance(state, dict) else {"state": state})})


def load_lazy(path: PathLike) -> Any:
    """Unpickle a ``torch.save`` file's structure with every tensor as a ``LazyTensor``.

    Like ``torch.load(weights_only=False)`` this runs the file's pickle: only open files you trust.
    """
    path = Path(path)
    data, offsets = _record_offsets(path)

    def rebuild(storage: _Storage, storage_offset: int, size: tuple, stride: tuple, *_: Any) -> LazyTensor:
        shape = torch.Size(size)
        expect, contiguous = 1, True
        for dim, st in zip(reversed(shape), reversed(stride)):
            contiguous &= dim == 1 or st == expect
            expect *= dim
        item = torch.empty((), dtype=storage.dtype).element_size()
        return LazyTensor(str(path), storage.dtype, shape, storage.offset + storage_offset * item, contiguous)

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                return rebuild
            if (module, name) in (("torch._utils", "_rebuild_parameter"),
                                  ("torch._utils", "_rebuild_parameter_with_state")):
                return lambda data, *_: data
            try:
                return super().find_class(module, name)
            except ImportError:
                if not module.startswith("deepspeed"):
                    raise
                return _stand_in(name)

        def persistent_load(self, saved_id: tuple) -> _Storage:
            _, storage_type, key, _location, _numel = saved_id
            with warnings.catch_warnings():  # reading a legacy storage class's dtype warns about TypedStorage
                warnings.simplefilter("ignore", UserWarning)
                dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
            if key not in offsets:
                raise ValueError(f"{path}: storage record data/{key} is missing or compressed")
            return _Storage(key, dtype, offsets[key])

    import io

    return Unpickler(io.BytesIO(data)).load()


def iter_tensors(obj: Any, prefix: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    """``(path, leaf)`` for every tensor or ``LazyTensor`` in nested dicts, lists and tuples."""
    if isinstance(obj, (torch.Tensor, LazyTensor)):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from iter_tensors(v, prefix + (k,))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from iter_tensors(v, prefix + (i,))


def placeholder(shape: Any, fill: Callable[[int, int], torch.Tensor], fillers: dict,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised tensor for ``save_streamed`` whose bytes ``fill(start, end)`` provides (registered in ``fillers``)."""
    t = torch.empty(shape, dtype=dtype)  # never touched: save_streamed fills the file instead
    fillers[id(t)] = fill
    return t


def save_streamed(obj: Any, path: PathLike, fillers: dict[int, Filler]) -> None:
    """``torch.save(obj, path)`` where the tensors named in ``fillers`` (by ``id``) are placeholders.

    Each placeholder must be a contiguous CPU tensor that owns its whole storage (``torch.empty``);
    its bytes are written afterwards, ``_CHUNK_ELEMENTS`` at a time, from ``fillers[id(t)](start, end)``.
    Other tensors are written as usual. Every byte is checked and the file is renamed onto
    ``path`` only when complete (see [Note: checkpoint outputs]).

    Raises:
        CheckpointWriteError: a full disk or another write failure, naming ``path``; ``path``
            is untouched and no temporary file is left.
    """
    path = Path(path)
    with staged_file(path, needed=data_nbytes(obj)) as tmp:
        with torch.serialization.skip_data():
            torch_save(obj, tmp)
        placed = dict(iter_tensors(load_lazy(tmp)))
        fd = os.open(tmp, os.O_WRONLY)
        try:
            for where, tensor in iter_tensors(obj):
                fill = fillers.get(id(tensor))
                target = placed[where]
                if fill is None:
                    data = tensor.detach().contiguous().reshape(-1)
                    pwrite_all(fd, memoryview(data.view(torch.uint8).numpy()), target.byte_offset, tmp)
                    continue
                item = tensor.element_size()
                for start in range(0, tensor.numel(), _CHUNK_ELEMENTS):
                    end = min(start + _CHUNK_ELEMENTS, tensor.numel())
                    piece = fill(start, end).to(tensor.dtype).contiguous()
                    pwrite_all(fd, memoryview(piece.view(torch.uint8).numpy()), target.byte_offset + start * item, tmp)
        finally:
            os.close(fd)


def save_small(obj: Any, path: PathLike) -> None:
    """``torch.save`` of an object held in memory, through ``staged_file`` (see [Note: checkpoint outputs])."""
    with staged_file(Path(path), needed=data_nbytes(obj)) as tmp:
        torch_save(obj, tmp)

"""``CheckpointReader``: one committed sharded version, every file cross-checked before any byte is used.

[Note: sharded checkpoint integrity]
Every file of a version carries a CRC-32 computed while it was written: each rank index
records one per chunk of its ``.bin`` (a chunk is one state tensor of one bucket shard);
``metadata.json`` records the size and CRC of ``common.pt`` and of every rank index and
``.bin``, and a CRC of its own canonical JSON. Opening a version checks, in this order, so
that a message names the most specific field: the metadata's fields and types, the size
and CRC of ``common.pt``, every rank index's fields against the metadata (rank, world
size, step of each param, sizes), each param piece against its param (in bounds, inside
one chunk) and all pieces of a state tensor against each other (they cover it exactly
once), each index's CRC, and last the metadata's own CRC. The CRC of a ``.bin`` chunk
is checked when the chunk is first read (every chunk, by ``verify_all``). Any failure is
a ``CheckpointError`` naming the file and the field.
"""
from __future__ import annotations

import io
import json
import math
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any, Union

import torch

from ..kernels.rule import ADAM
from .files import CheckpointError, CheckpointFileMissing, committed_versions, version_name

__all__ = ["CheckpointReader", "SHARDED_FORMAT", "SHARDED_VERSION", "canonical_json"]

SHARDED_FORMAT = "sharded_fused_adam/sharded"
SHARDED_VERSION = 2
_DTYPES = {"float16", "bfloat16", "float32", "float64"}
_CACHED_CHUNKS = 4


def canonical_json(doc: dict) -> bytes:
    """The bytes a JSON document is written as (and its CRC computed over)."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _field(doc: Any, key: str, kind: Union[type, tuple], file: Path, where: str = "") -> Any:
    if not isinstance(doc, dict) or key not in doc:
        raise CheckpointError(f"{file}: missing field {where}{key!r}")
    value = doc[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise CheckpointError(f"{file}: field {where}{key!r} has the wrong type ({type(value).__name__})")
    return value


def _read_bytes(file: Path) -> bytes:
    try:
        return file.read_bytes()
    except FileNotFoundError:
        raise CheckpointFileMissing(f"checkpoint file {file} is missing") from None


def _load_json(file: Path) -> dict:
    raw = _read_bytes(file)
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint file {file} is corrupt (not valid JSON): {exc}") from exc
    if not isinstance(doc, dict):
        raise CheckpointError(f"checkpoint file {file} is corrupt: a JSON {type(doc).__name__}, expected an object")
    return doc


def _check_crc(file: Path, data: bytes, expected: int, field: str) -> None:
    if zlib.crc32(data) != expected:
        raise CheckpointError(f"checkpoint file {file} is corrupt: its CRC-32 {zlib.crc32(data):#010x} does not "
                              f"match {field} = {expected:#010x}")


def _check_index_format(file: Path, index: dict) -> None:
    """A rank index names its format, and since version 2 files of this code also its version (older
    version-2 indexes lack the field: the metadata's version, checked first, covers them)."""
    if _field(index, "format", str, file) != SHARDED_FORMAT:
        raise CheckpointError(f"{file}: field 'format' is {index['format']!r}, not a {SHARDED_FORMAT} rank index: "
                              f"written by another format or version; this code reads {SHARDED_FORMAT} version "
                              f"{SHARDED_VERSION}")
    if "version" in index and _field(index, "version", int, file) != SHARDED_VERSION:
        raise CheckpointError(f"{file}: field 'version' is {index['version']}: written by format version "
                              f"{index['version']}, this code reads version {SHARDED_VERSION}")


class CheckpointReader:
    """A checked view of the newest committed version under ``path`` (see [Note: sharded checkpoint integrity]).

    Args:
        path: the checkpoint directory.
        verify: check each ``.bin`` chunk's CRC when it is read (the small files are always checked).

    Raises:
        CheckpointFileMissing: no committed version, or a file of it is missing.
        CheckpointError: any other inconsistency, naming the file and the field.
    """

    def __init__(self, path: Union[str, Path], *, verify: bool = True):
        path = Path(path)
        versions = committed_versions(path)
        if not versions:
            raise CheckpointFileMissing(f"no sharded checkpoint at {path}: no committed version folder "
                                        f"(LATEST does not exist or names nothing)")
        self.folder = path / version_name(versions[-1])
        self.verify = verify
        self.meta = self._metadata()
        self.shapes = {p["index"]: tuple(p["shape"]) for p in self.meta["params"]}
        self.steps = {p["index"]: p["step"] for p in self.meta["params"]}
        self.common = self._common()
        self.pieces: dict[tuple[int, str], list[tuple[int, int, str, int, str]]] = {}
        self.chunks: dict[str, list[tuple[int, int, int]]] = {}
        indexes = [self._rank_index(rank, entry) for rank, entry in enumerate(self.meta["files"])]
        self._check_coverage()
        for rank, (file, index) in enumerate(indexes):  # after the checks that name a field
            _check_crc(file, canonical_json(index), self.meta["files"][rank]["index_crc32"],
                       f"metadata.json field files[{rank}].index_crc32")
        self._check_metadata_crc()
        self._cache: OrderedDict[tuple[str, int], bytes] = OrderedDict()

    # ---- the small files ----
    def _metadata(self) -> dict:
        file = self.folder / "metadata.json"
        meta = _load_json(file)
        if _field(meta, "format", str, file) != SHARDED_FORMAT:
            raise CheckpointError(f"{file}: field 'format' is {meta['format']!r}, not a {SHARDED_FORMAT} checkpoint")
        if _field(meta, "version", int, file) != SHARDED_VERSION:
            raise CheckpointError(f"{file}: field 'version' is {meta['version']}: written by format version "
                                  f"{meta['version']}, this code reads version {SHARDED_VERSION} (load it with the "
                                  "sharded_fused_adam release that wrote it)")
        world_size = _field(meta, "world_size", int, file)
        if world_size < 1:
            raise CheckpointError(f"{file}: field 'world_size' must be >= 1, got {world_size}")
        for i, p in enumerate(_field(meta, "params", list, file)):
            where = f"params[{i}]."
            if _field(p, "index", int, file, where) != i:
                raise CheckpointError(f"{file}: field {where}index is {p['index']}, expected {i}")
            shape = _field(p, "shape", list, file, where)
            if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
                raise CheckpointError(f"{file}: field {where}shape is {shape}, not a list of sizes")
            if _field(p, "step", int, file, where) < 0:
                raise CheckpointError(f"{file}: field {where}step is {p['step']}, must be >= 0")
        files = _field(meta, "files", list, file)
        if len(files) != world_size:
            raise CheckpointError(f"{file}: field 'files' lists {len(files)} rank files, "
                                  f"but world_size is {world_size}")
        for r, entry in enumerate(files):
            where = f"files[{r}]."
            if _field(entry, "name", str, file, where) != f"rank{r:05d}":
                raise CheckpointError(f"{file}: field {where}name is {entry['name']!r}, expected 'rank{r:05d}'")
            for key in ("nbytes", "index_crc32"):
                _field(entry, key, int, file, where)
        for key in ("nbytes", "crc32"):
            _field(_field(meta, "common", dict, file), key, int, file, "common.")
        _field(meta, "crc32", int, file)
        return meta

    def _check_metadata_crc(self) -> None:
        """Last, so that an edit the cross-checks can name is reported by them."""
        body = {k: v for k, v in self.meta.items() if k != "crc32"}
        if zlib.crc32(canonical_json(body)) != self.meta["crc32"]:
            raise CheckpointError(f"{self.folder / 'metadata.json'}: field 'crc32' does not match the file's "
                                  "contents (edited or corrupt)")

    def _common(self) -> dict:
        file = self.folder / "common.pt"
        raw = _read_bytes(file)
        if len(raw) != self.meta["common"]["nbytes"]:
            raise CheckpointError(f"checkpoint file {file} is truncated or corrupt: {len(raw)} bytes, "
                                  f"metadata.json field common.nbytes = {self.meta['common']['nbytes']}")
        _check_crc(file, raw, self.meta["common"]["crc32"], "metadata.json field common.crc32")
        try:
            common = torch.load(io.BytesIO(raw), weights_only=True)
        except Exception as exc:  # torch raises RuntimeError, EOFError, pickle errors...
            raise CheckpointError(f"checkpoint file {file} cannot be read by torch.load: {exc}") from exc
        _field(common, "param_groups", list, file)
        _field(common, "loss_scaler", dict, file)
        return common

    def _rank_index(self, rank: int, entry: dict) -> tuple[Path, dict]:
        file = self.folder / f"{entry['name']}.json"
        binary = self.folder / f"{entry['name']}.bin"
        index = _load_json(file)
        _check_index_format(file, index)
        for key, expected in (("rank", rank), ("world_size", self.meta["world_size"]), ("nbytes", entry["nbytes"])):
            if _field(index, key, int, file) != expected:
                raise CheckpointError(f"{file}: field {key!r} is {index[key]}, metadata.json says {expected}")
        for i, pair in enumerate(_field(index, "steps", list, file)):
            param, step = pair if isinstance(pair, list) and len(pair) == 2 else (None, None)
            if param not in self.steps:
                raise CheckpointError(f"{file}: field steps[{i}] names param {param!r}, the checkpoint has "
                                      f"params 0..{len(self.steps) - 1}")
            if step != self.steps[param]:
                raise CheckpointError(f"{file}: field steps[{i}] gives param {param} step {step}, but "
                                      f"metadata.json field params[{param}].step is {self.steps[param]}")
        chunks, end = [], 0
        for i, chunk in enumerate(_field(index, "chunks", list, file)):
            if not (isinstance(chunk, list) and len(chunk) == 3 and chunk[0] == end and chunk[1] >= 0):
                raise CheckpointError(f"{file}: field chunks[{i}] is {chunk}; chunks must tile the file from byte "
                                      f"{end} as [offset, nbytes, crc32]")
            chunks.append(tuple(chunk))
            end += chunk[1]
        if end != entry["nbytes"]:
            raise CheckpointError(f"{file}: field 'chunks' covers {end} bytes, nbytes is {entry['nbytes']}")
        for i, piece in enumerate(_field(index, "pieces", list, file)):
            self._add_piece(file, i, piece, chunks, binary)
        try:
            size = binary.stat().st_size
        except FileNotFoundError:
            raise CheckpointFileMissing(f"checkpoint file {binary} is missing") from None
        if size != entry["nbytes"]:
            raise CheckpointError(f"checkpoint file {binary} is truncated or corrupt: {size} bytes, "
                                  f"metadata.json field files[{rank}].nbytes = {entry['nbytes']}")
        self.chunks[str(binary)] = chunks
        return file, index

    def _add_piece(self, file: Path, i: int, piece: Any, chunks: list, binary: Path) -> None:
        ok = isinstance(piece, list) and len(piece) == 6
        param, key, dtype, start, end, offset = piece if ok else (None,) * 6
        if not ok or param not in self.shapes or key not in ADAM.checkpoint_keys or dtype not in _DTYPES:
            raise CheckpointError(f"{file}: field pieces[{i}] = {piece} is not [param, key, dtype, start, end, "
                                  f"byte offset] with a known param, state key and dtype")
        numel = math.prod(self.shapes[param])
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= numel):
            raise CheckpointError(f"{file}: field pieces[{i}] covers elements [{start}, {end}) of param {param}, "
                                  f"which has {numel}")
        nbytes = (end - start) * torch.empty((), dtype=getattr(torch, dtype)).element_size()
        if not isinstance(offset, int) or not any(o <= offset and offset + nbytes <= o + n for o, n, _ in chunks):
            raise CheckpointError(f"{file}: field pieces[{i}] has byte offset {offset} ({nbytes} bytes), which does "
                                  f"not lie inside one chunk of {binary.name}")
        self.pieces.setdefault((param, key), []).append((start, end, str(binary), offset, dtype))

    def _check_coverage(self) -> None:
        for (param, key), pieces in self.pieces.items():
            pieces.sort()
            covered, dtypes = 0, {p[4] for p in pieces}
            for start, end, file, _, _ in pieces:
                if start != covered:
                    what = "twice" if start < covered else "not at all"
                    raise CheckpointError(f"{file}: the pieces of {key} of param {param} cover elements "
                                          f"[{min(start, covered)}, {max(start, covered)}) {what}")
                covered = end
            if covered != math.prod(self.shapes[param]) or len(dtypes) != 1:
                raise CheckpointError(f"{self.folder}: the pieces of {key} of param {param} cover {covered} of its "
                                      f"{math.prod(self.shapes[param])} elements in dtypes {sorted(dtypes)}")
        for param, step in self.steps.items():
            for key in ADAM.moment_keys:
                if step > 0 and (param, key) not in self.pieces:
                    raise CheckpointError(f"{self.folder / 'metadata.json'}: field params[{param}].step is {step} "
                                          f"but no rank file holds its {key}")

    # ---- the data ----
    def _chunk(self, file: str, offset: int) -> tuple[int, bytes]:
        """The verified chunk holding byte ``offset`` of ``file``: (its first byte, its bytes)."""
        i = next(i for i, (o, n, _) in enumerate(self.chunks[file]) if o <= offset < o + n)
        start, nbytes, crc = self.chunks[file][i]
        if (file, i) not in self._cache:
            with open(file, "rb") as f:
                f.seek(start)
                data = f.read(nbytes)
            if len(data) != nbytes or zlib.crc32(data) != crc:
                index = Path(file).with_suffix(".json").name
                raise CheckpointError(f"checkpoint file {file} is corrupt: chunk {i} (bytes {start}..{start + nbytes})"
                                      f" fails its CRC-32 (field chunks[{i}] of {index})")
            self._cache[(file, i)] = data
            if len(self._cache) > _CACHED_CHUNKS:
                self._cache.popitem(last=False)
        return start, self._cache[(file, i)]

    def _bytes(self, file: str, offset: int, nbytes: int) -> bytearray:
        if self.verify:
            start, data = self._chunk(file, offset)
            return bytearray(data[offset - start: offset - start + nbytes])
        with open(file, "rb") as f:
            f.seek(offset)
            return bytearray(f.read(nbytes))

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
            kind = getattr(torch, dtype)
            item = torch.empty((), dtype=kind).element_size()
            raw = self._bytes(file, offset + (lo - p_start) * item, (hi - lo) * item)
            out.narrow(0, lo - start, hi - lo).copy_(torch.frombuffer(raw, dtype=kind))
        return True

    def verify_all(self) -> None:
        """Check the CRC of every chunk of every ``.bin`` file (what ``consolidate`` and the CLI do)."""
        for file, chunks in self.chunks.items():
            for offset, nbytes, _ in chunks:
                if nbytes:
                    self._chunk(file, offset)

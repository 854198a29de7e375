"""File primitives of the checkpoint formats: checksummed writes, atomic replaces, version folders, crash points.

[Note: checkpoint commit point]
A sharded version is written as ``vK.tmp/`` and becomes ``vK/`` by one atomic directory
rename, done by rank 0 only after every rank's files and the metadata were written and
flushed to disk. That rename is the commit: a folder named exactly ``vNNNNNNNN`` is always
complete, ``LATEST`` only repeats which one is newest (for tools and people), and readers
take the highest-numbered committed version. Everything else a killed save can leave
(``vK.tmp/``, ``vK.del/`` of an interrupted prune, ``LATEST.tmp``, a ``LATEST`` naming an
older or a missing version) is debris: ``recover`` removes or repairs it before a save, and
a new version's number is above every number found on disk, debris included, so it never
collides with anything.
"""
from __future__ import annotations

import os
import re
import shutil
import zlib
from pathlib import Path
from typing import BinaryIO, Optional

import torch

__all__ = ["CheckpointError", "CheckpointFileMissing", "CheckpointWriteError", "ChecksumFile", "crc32_of",
           "write_atomic", "fsync_dir", "crash_point", "SAVE_STEPS", "SAVE_FULL_STEPS", "version_name",
           "committed_versions", "recover", "CRASH_EXIT_CODE", "check_version"]

_VERSION = re.compile(r"v(\d{8})")
_ANY_VERSION = re.compile(r"v(\d{8})(\..*)?")
CRASH_EXIT_CODE = 77


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt, locked by another job or of a different model."""


class CheckpointFileMissing(CheckpointError, FileNotFoundError):
    """No checkpoint at the path, or one of its files is gone (also a ``FileNotFoundError``)."""


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint output could not be written (a full disk, a quota, an I/O error; also an ``OSError``).

    The message names the path and, for a full disk, the bytes needed and free; ``errno`` is
    ``ENOSPC`` then. Whatever the final name held before is intact (see [Note: checkpoint outputs]).
    """


# [Note: save steps] (docs/checkpoints.md lists them with what a kill at each leaves behind)
SAVE_STEPS = (
    "locked",            # rank 0 holds the directory lock
    "recovered",         # rank 0 cleaned debris and chose the version number
    "tmp_created",       # every rank: vK.tmp/ exists
    "rank_file_partial",  # every rank: only the first chunk of rankNNNNN.bin written
    "rank_files_written",  # every rank: rankNNNNN.bin and .json flushed
    "all_ranks_written",  # after the barrier
    "common_written",    # rank 0: common.pt flushed
    "metadata_written",  # rank 0: metadata.json flushed
    "committed",         # rank 0: vK.tmp renamed to vK (the commit point)
    "latest_written",    # rank 0: LATEST names vK
    "prune_partial",     # rank 0: an old version renamed to .del, not yet deleted
    "pruned",            # rank 0: old versions deleted, before the final barrier
)
SAVE_FULL_STEPS = ("gathered", "tmp_partial", "tmp_written", "replaced")


def check_version(file: object, extra: object, reads: int) -> None:
    """Refuse a gathered state dict whose ``sharded_fused_adam.version`` is not the one this code reads.

    Files without our entry (torch's own ``state_dict()``) have no version and are accepted.

    Raises:
        CheckpointError: naming the file, the version that wrote it and the one this code reads.
    """
    if not isinstance(extra, dict) or "version" not in extra:
        return
    if extra["version"] != reads:
        raise CheckpointError(f"{file}: field sharded_fused_adam.version is {extra['version']!r}: written by format "
                              f"version {extra['version']!r}, this code reads version {reads}. Load it with the "
                              "sharded_fused_adam release that wrote it (or convert it there to torch's layout)")


def crash_point(step: str, rank: int) -> None:
    """Test seam: exit at once (``os._exit``) if ``SFA_CHECKPOINT_CRASH_AT`` names ``step``.

    ``SFA_CHECKPOINT_CRASH_RANK`` (default 0) picks the rank that dies. Reading two
    environment variables is all it costs when unset.
    """
    if os.environ.get("SFA_CHECKPOINT_CRASH_AT") != step:
        return
    if int(os.environ.get("SFA_CHECKPOINT_CRASH_RANK", "0")) == rank:
        os._exit(CRASH_EXIT_CODE)


def crc32_of(data: torch.Tensor, crc: int = 0) -> int:
    """CRC-32 of a CPU tensor's bytes, read in place (no copy)."""
    flat = data.detach().contiguous().reshape(-1)
    return zlib.crc32(memoryview(flat.view(torch.uint8).numpy()), crc) if flat.numel() else crc


class ChecksumFile:
    """A binary file written sequentially whose CRC-32 is computed from the bytes as they are written.

    ``close`` flushes and fsyncs; ``crc`` and ``nbytes`` then describe the whole file.
    ``partial_step`` names a ``crash_point`` reached once, right after the first write.
    """

    def __init__(self, path: Path, *, partial_step: Optional[tuple[str, int]] = None):
        self.path = path
        self._file: BinaryIO = open(path, "wb")
        self._partial_step = partial_step
        self.crc = 0
        self.nbytes = 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self._file.write(view)
        self.crc = zlib.crc32(view, self.crc)
        self.nbytes += view.nbytes
        if self._partial_step is not None:
            self._file.flush()
            step, self._partial_step = self._partial_step, None
            crash_point(*step)
        return view.nbytes

    def write_tensor(self, data: torch.Tensor) -> tuple[int, int]:
        """Write a CPU tensor's bytes; returns (nbytes, crc32) of just this tensor."""
        flat = data.detach().contiguous().reshape(-1)
        view = memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")
        self._file.write(view)
        crc = zlib.crc32(view)
        self.crc = zlib.crc32(view, self.crc)
        self.nbytes += view.nbytes
        return view.nbytes, crc

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def __enter__(self) -> "ChecksumFile":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
            return
        try:
            self._file.close()
        except OSError:
            pass  # flushing the rest fails too on a full disk; the error being raised says why


def fsync_dir(path: Path) -> None:
    """fsync a directory (or a file) by its path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> int:
    """Write ``data`` to ``path`` through a flushed temporary file and a rename; returns its CRC-32."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with ChecksumFile(tmp) as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # nothing left after the rename; no debris after a failure
    return zlib.crc32(data)


def version_name(version: int) -> str:
    return f"v{version:08d}"


def committed_versions(path: Path) -> list[int]:
    """Numbers of the committed versions under ``path``, ascending (see [Note: checkpoint commit point])."""
    if not path.is_dir():
        return []
    found = (_VERSION.fullmatch(p.name) for p in path.iterdir())
    return sorted(int(m.group(1)) for m in found if m and (path / m.group(0)).is_dir())


def _latest_pointer(path: Path) -> Optional[int]:
    try:
        match = _VERSION.fullmatch((path / "LATEST").read_text().strip())
    except (OSError, UnicodeDecodeError):
        return None
    return int(match.group(1)) if match else None


def recover(path: Path) -> int:
    """Clear what killed saves left under ``path`` and return the next free version number.

    Called by the one writer (rank 0, holding the lock) before a save: incomplete
    ``vK.tmp``/``vK.del`` folders and ``LATEST.tmp`` are removed, a ``LATEST`` that does not
    name the newest committed version is rewritten (finishing a save killed between its
    commit and its pointer update), and the number returned is above every number seen.
    """
    highest = _latest_pointer(path) or 0
    for entry in path.iterdir():
        match = _ANY_VERSION.fullmatch(entry.name)
        if match is None:
            continue
        highest = max(highest, int(match.group(1)))
        if match.group(2) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
    (path / "LATEST.tmp").unlink(missing_ok=True)
    versions = committed_versions(path)
    if versions and _latest_pointer(path) != versions[-1]:
        write_atomic(path / "LATEST", version_name(versions[-1]).encode())
        fsync_dir(path)
    return highest + 1

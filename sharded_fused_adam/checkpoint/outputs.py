"""Writing checkpoint outputs safely: every byte checked, a temporary name, fsync, one rename; a full disk is loud.

[Note: checkpoint outputs]
Every file or folder a checkpoint writer produces (sharded saves, ``save_full``, every
converter target) is written under a hidden temporary sibling name
(``.NAME.tmp<pid>.<thread>``), flushed to disk (each file fsynced, then its folder) and
renamed onto its final name only once complete, so the final name holds either the
previous output or the complete new one. ``os.write``/``os.pwrite`` may write fewer bytes
than asked (on a nearly full disk they do); ``pwrite_all`` loops until every byte is
written or the kernel says why not. Before writing, the free space is compared with the
bytes the output needs at least (its tensor data), so a disk that is already too full is
refused before anything is touched. Any failure (``ENOSPC``, a quota, I/O errors, torch's
serializer failing underneath) removes the temporary and becomes a ``CheckpointWriteError``
naming the path, the bytes needed and the bytes free. What cannot be made atomic is the
pair "folder, then pointer file" (``LATEST``, DeepSpeed's ``latest``): the pointer is
written after the folder it names, itself through a temporary name.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from .files import ChecksumFile, CheckpointWriteError, crash_point, fsync_dir

__all__ = ["free_bytes", "check_space", "pwrite_all", "write_failure", "staged_file", "staged_dir", "fsync_tree",
           "temporary_name", "write_small", "data_nbytes", "write_torch_file", "remove_debris", "torch_save"]

_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> Optional[int]:
    """Bytes an unprivileged writer may still use on ``path``'s filesystem (None if it cannot be asked)."""
    try:
        st = os.statvfs(_existing(Path(path)))
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _is_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised from: torch wraps the OSError of a file-like) is a full disk."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in _FULL:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def write_failure(path: Path, exc: BaseException, needed: int) -> CheckpointWriteError:
    """The error for a failed write of ``path``: it names the path, the cause, the bytes needed and free."""
    if not _is_full(exc):
        return CheckpointWriteError(f"cannot write checkpoint output {path}: {type(exc).__name__}: {exc}; nothing "
                                    "was replaced and no partial file was left")
    free = free_bytes(path)
    space = f"{free if free is not None else '?'} bytes are free there"
    space = f"it needs at least {needed} bytes, {space}" if needed > 0 else space
    error = CheckpointWriteError(f"cannot write checkpoint output {path}: the disk is full ({space}); "
                                 "nothing was replaced and no partial file was left")
    error.errno = errno.ENOSPC
    return error


def check_space(path: Path, needed: int) -> None:
    """Refuse at once to write the output ``path`` when its filesystem has fewer than ``needed`` bytes free.

    Raises:
        CheckpointWriteError: naming ``path``, ``needed`` and the bytes free.
    """
    free = free_bytes(path)
    if free is not None and free < needed:
        error = CheckpointWriteError(f"cannot write checkpoint output {path}: the disk is full (it needs at least "
                                     f"{needed} bytes, {free} bytes are free there); nothing was written")
        error.errno = errno.ENOSPC
        raise error


def pwrite_all(fd: int, data: memoryview, offset: int, path: Path) -> None:
    """``os.pwrite`` every byte of ``data`` at ``offset``, looping over short writes.

    Raises:
        OSError: the kernel's error, or ``ENOSPC`` when a write makes no progress.
    """
    view = memoryview(data).cast("B")
    while view.nbytes:
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(errno.ENOSPC, "write made no progress", str(path))
        view, offset = view[written:], offset + written


def write_small(path: Path, data: bytes) -> None:
    """Write a small file (a pointer such as ``latest``) through ``staged_file``: never empty, never partial."""
    with staged_file(path, needed=len(data)) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            pwrite_all(fd, memoryview(data), 0, tmp)
        finally:
            os.close(fd)


def temporary_name(path: Path, kind: str = "tmp") -> Path:
    """The hidden sibling of ``path`` a writer in this process and thread uses."""
    return path.with_name(f".{path.name}.{kind}{os.getpid()}.{threading.get_ident()}")


def fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder``, then every folder, deepest first."""
    for root, dirs, files in os.walk(folder, topdown=False):
        for name in files:
            fsync_dir(Path(root) / name)
        fsync_dir(Path(root))


@contextmanager
def staged_file(path: Path, *, needed: int = 0) -> Iterator[Path]:
    """Yield a temporary name to write ``path`` under; on success it is fsynced and renamed onto ``path``.

    Raises:
        CheckpointWriteError: too little space, or the write failed (the temporary is removed).
    """
    path = Path(path)
    check_space(path, needed)
    tmp = temporary_name(path)
    try:
        yield tmp
        fsync_dir(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except (OSError, RuntimeError) as exc:
        raise write_failure(path, exc, needed) from exc
    finally:
        tmp.unlink(missing_ok=True)  # nothing left after the rename


def _swap_in(tmp: Path, final: Path) -> None:
    """Rename folder ``tmp`` onto ``final``, moving an existing ``final`` aside first (a folder cannot be
    renamed onto a non-empty one); the old one is put back if the second rename fails."""
    old = temporary_name(final, "old") if final.exists() else None
    if old is not None:
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except OSError:
        if old is not None:
            os.replace(old, final)
        raise
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_dir(final: Path, *, needed: int = 0) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success every file in it is fsynced and it replaces ``final``.

    On failure the temporary folder, and ``final``'s parent if this call created it, are removed.

    Raises:
        CheckpointWriteError: too little space, or a write failed.
    """
    final = Path(final)
    created = _existing(final.parent)
    check_space(final, needed)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(final)
    try:
        tmp.mkdir()
        yield tmp
        fsync_tree(tmp)
        _swap_in(tmp, final)
    except (OSError, RuntimeError) as exc:
        raise write_failure(final, exc, needed) from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
            _remove_created(final.parent, created)


def _remove_created(folder: Path, existing: Path) -> None:
    """Remove the empty folders from ``folder`` up to (not including) ``existing``, which this write created."""
    while folder != existing and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent


def data_nbytes(obj: Any) -> int:
    """Bytes of tensor data in nested dicts, lists and tuples: what a ``torch.save`` of ``obj`` needs at least."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(data_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(data_nbytes(v) for v in obj)
    return 0


def _pid_of_other_live_process(name: str) -> bool:
    match = re.search(r"\.tmp(\d+)", name)
    if match is None or int(match.group(1)) == os.getpid():
        return False
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_debris(path: Path) -> None:
    """Remove the temporaries of killed writes of ``path`` (``.NAME.tmp<pid>...``), not those of live
    processes (this process's own writers are serialised, see [Note: one save at a time per process])."""
    for stale in path.parent.glob(f".{path.name}.tmp*"):
        if not _pid_of_other_live_process(stale.name):
            stale.unlink(missing_ok=True)


def torch_save(obj: Any, file: Path) -> None:
    """``torch.save`` through a Python file object: torch's own writer, given a path, reports a full disk as
    ``RuntimeError: ... unexpected pos``; through a file object the ``OSError`` (``ENOSPC``) stays attached."""
    with open(file, "wb") as f:
        torch.save(obj, f)


def write_torch_file(path: Path, obj: Any) -> None:
    """``torch.save(obj)`` onto ``path`` through ``staged_file``, removing the debris of killed saves first.

    Crash points ``tmp_partial`` and ``tmp_written`` (``SAVE_FULL_STEPS``) are reached on the way.

    Raises:
        CheckpointWriteError: a full disk or another write failure; ``path`` is untouched.
    """
    path = Path(path)
    remove_debris(path)
    with staged_file(path, needed=data_nbytes(obj)) as tmp:
        with ChecksumFile(tmp, partial_step=("tmp_partial", 0)) as f:
            torch.save(obj, f)
        crash_point("tmp_written", 0)

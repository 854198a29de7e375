"""One writer per checkpoint directory: a lock file naming the job that owns it, with stale-lock detection.

[Note: checkpoint directory lock]
The first ``save_sharded`` of a job creates ``path/LOCK`` with ``O_EXCL`` (atomic on local
filesystems and NFSv3+) holding the owner: host, pid, job id (``SLURM_JOB_ID``,
``TORCHELASTIC_RUN_ID``, ``OMPI_MCA_orte_ess_jobid``, ``PMIX_NAMESPACE`` or ``SFA_JOB_ID``)
and the time. The job keeps it until it exits (released at normal interpreter exit) and a
daemon thread touches the file every ``HEARTBEAT_S`` seconds. Another job finds it and
fails at once with the owner in the message; it changes nothing. A lock is stale, and is
taken over, when its pid is dead on this same host, when its job id equals ours (a
requeued or restarted job), or when it was not touched for ``STALE_AFTER_S`` seconds (a
job on another host that died). A job whose lock was taken over or deleted refuses to
save rather than write beside the new owner. Two live processes of the same job on one host
(the same job id, both pids alive) are two writers, not a restart: the second is refused.

[Note: one save at a time per process]
The lock file names a process; threads of that process share it. So a save also holds a
process-wide claim on its directory (or file) for its duration: a second ``save_sharded`` or
``save_full`` into the same place from another thread of the same process, while the first
runs, is refused at once with a ``CheckpointLockedError`` naming the thread that is saving
(serialising them instead would let two threads' collectives pair up in different orders on
different ranks, and a later call could commit older state).
"""
from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from .files import CheckpointError

__all__ = ["CheckpointLockedError", "DirectoryLock", "acquire", "job_identity", "one_save_at_a_time", "HEARTBEAT_S",
           "STALE_AFTER_S"]

HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
_JOB_ID_VARIABLES = ("SFA_JOB_ID", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID", "OMPI_MCA_orte_ess_jobid", "PMIX_NAMESPACE")


class CheckpointLockedError(CheckpointError):
    """Another job owns the checkpoint directory."""


def job_identity() -> dict:
    """Who this process is, as written into a lock file."""
    job_id = next((os.environ[v] for v in _JOB_ID_VARIABLES if os.environ.get(v)), "")
    return {"host": socket.gethostname(), "pid": os.getpid(), "job_id": job_id, "time": time.time(),
            "token": uuid.uuid4().hex}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead: its parent has not reaped it yet
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _stale_reason(holder: dict, age_s: float, me: dict, stale_after_s: float) -> Optional[str]:
    """Why a lock held by ``holder`` may be taken over, or None if its owner may be alive."""
    if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"]):
        return f"its process {holder['pid']} on this host is gone"
    alive_here = holder.get("host") == me["host"] and holder.get("pid") != me["pid"]  # (dead pids returned above)
    if holder.get("job_id") and holder.get("job_id") == me["job_id"] and not alive_here:
        return f"it belongs to this same job ({me['job_id']}), restarted"
    if age_s > stale_after_s:
        return f"it was last refreshed {age_s:.0f} s ago (> {stale_after_s:.0f} s)"
    return None


@dataclass
class DirectoryLock:
    """A held lock on one directory (see [Note: checkpoint directory lock])."""

    file: Path
    identity: dict
    _stop: threading.Event

    def check_still_ours(self) -> None:
        """Raises CheckpointLockedError if the lock file no longer holds our token."""
        holder = _read(self.file)
        if holder is None or holder.get("token") != self.identity["token"]:
            owner = "nobody (the lock file was deleted)" if holder is None else _describe(holder)
            raise CheckpointLockedError(f"this job lost its lock {self.file}: it is now held by {owner}; "
                                        "refusing to save beside another writer")
        os.utime(self.file)

    def release(self) -> None:
        self._stop.set()
        holder = _read(self.file)
        # A forked child inherits the lock object but must never release its parent's lock.
        if holder is not None and holder.get("token") == self.identity["token"] and os.getpid() == self.identity["pid"]:
            self.file.unlink(missing_ok=True)


def _read(file: Path) -> Optional[dict]:
    try:
        return json.loads(file.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # half-written or garbage: treated as held by an unknown owner


def _describe(holder: dict) -> str:
    when = holder.get("time")
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when)) if isinstance(when, (int, float)) else "?"
    return (f"host {holder.get('host', '?')} pid {holder.get('pid', '?')} job {holder.get('job_id') or '-'} "
            f"(since {stamp})")


_held: dict[Path, DirectoryLock] = {}
_held_guard = threading.Lock()  # acquire() is called from any thread
_saving: dict[Path, str] = {}  # path -> the thread saving into it (see [Note: one save at a time per process])


@contextmanager
def one_save_at_a_time(target: Path, what: str) -> Iterator[None]:
    """Claim ``target`` for this thread while ``what`` runs in it.

    Raises:
        CheckpointLockedError: another thread of this process is saving into ``target`` now.
    """
    key = Path(target).resolve()
    me = threading.current_thread().name
    with _held_guard:
        if key in _saving:
            raise CheckpointLockedError(
                f"{what} into {key} refused: thread {_saving[key]!r} of this same process (pid {os.getpid()}) is "
                f"saving into it right now. Saves into one place must not overlap: wait for the first one to "
                f"return before starting the next (collectives must be issued by one thread in the same order "
                f"on every rank)")
        _saving[key] = me
    try:
        yield
    finally:
        with _held_guard:
            del _saving[key]


def _heartbeat(file: Path, stop: threading.Event, interval: float) -> None:
    while not stop.wait(interval):
        try:
            os.utime(file)
        except OSError:
            return


def acquire(directory: Path, *, stale_after_s: float = STALE_AFTER_S,
            heartbeat_s: float = HEARTBEAT_S) -> DirectoryLock:
    """The lock on ``directory`` for this process: taken on first use, checked on every later one.

    Raises:
        CheckpointLockedError: another live job holds it (the message names that job).
    """
    directory = directory.resolve()
    with _held_guard:
        if directory in _held:
            _held[directory].check_still_ours()
            return _held[directory]
        lock = _take(directory, stale_after_s, heartbeat_s)
        _held[directory] = lock
        return lock


def _refusal(directory: Path, file: Path, holder: dict, me: dict, stale_after_s: float) -> CheckpointLockedError:
    """Why the live lock ``holder`` keeps us out, told truly: another job, or another process of this job."""
    if holder.get("host") == me["host"] and holder.get("job_id") and holder.get("job_id") == me["job_id"]:
        return CheckpointLockedError(
            f"checkpoint directory {directory} is locked by another process of this same job "
            f"({_describe(holder)}), which is still running: two processes of one job are saving into one "
            f"directory. Give each its own directory (or one process per job saves).")
    return CheckpointLockedError(
        f"checkpoint directory {directory} is locked by another job: {_describe(holder)}. Only one "
        f"job may save into a directory. If that job is dead, delete {file} (or wait: a lock "
        f"not refreshed for {stale_after_s:.0f} s is taken over).")


def _take(directory: Path, stale_after_s: float, heartbeat_s: float) -> DirectoryLock:
    file = directory / "LOCK"
    me = job_identity()
    payload = json.dumps(me).encode()
    for _ in range(3):
        try:
            fd = os.open(file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read(file)
            if holder is None:
                continue  # released between our open and our read
            try:
                age = time.time() - file.stat().st_mtime
            except FileNotFoundError:
                continue
            reason = _stale_reason(holder, age, me, stale_after_s)
            if reason is None:
                raise _refusal(directory, file, holder, me, stale_after_s) from None
            file.unlink(missing_ok=True)  # stale; a racing taker is caught by O_EXCL above
            continue
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        stop = threading.Event()
        lock = DirectoryLock(file, me, stop)
        threading.Thread(target=_heartbeat, args=(file, stop, heartbeat_s), daemon=True,
                         name="sfa-checkpoint-lock").start()
        return lock
    raise CheckpointLockedError(f"could not take the lock {file}: other processes keep creating it")


@atexit.register
def _release_all() -> None:
    for lock in list(_held.values()):
        lock.release()
    _held.clear()

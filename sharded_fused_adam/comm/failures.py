"""What to say when a collective fails: which ranks never reached it, found through the store.

[Note: naming the missing rank]
A collective that a dead or stuck peer never joins fails on the survivors with a transport
error ("Connection reset by peer") or, once ``collective_timeout`` (else the process
group's timeout) has passed, "Operation timed out". Neither names the peer. Every
collective carries a sequence number, identical on all ranks because they issue
collectives in the same order. On failure a survivor records "I reached collective #seq"
in the rendezvous store (the one torch.distributed was initialized with, which outlives a
crashed worker under torchrun and our harness), plus "I failed", and gives the others a few
seconds to do the same; the ranks that show neither are the ones named as missing (a
survivor that failed in another collective, e.g. a point-to-point exchange with the dead
rank, waits on the same culprit). Nothing is
written to the store while training runs normally. Keys carry the group (its global
ranks), because sequence numbers count per group and several groups (shard, replicate,
model-parallel, or two jobs in one world) share the store; the message names global ranks
and lists the group's, since a group-local rank means nothing to someone reading logs.

[Note: abandoning a failed group]
After a collective failed, gloo's worker threads may still be blocked inside it (waiting
for bytes from a stopped peer, or from a survivor that gave up) until the process group's
own timeout, 30 minutes by default. The group's destructor joins those threads, and it
runs in ``destroy_process_group`` or at interpreter exit: the survivors never left. So
the error path abandons the group: it takes one extra reference to it that is never
released, so no destructor (and no join) ever runs; ``destroy_process_group`` and exit
then return at once and the blocked threads die with the process. The group is unusable
afterwards anyway; a job that wants to go on must create a new one. (``abort()`` does not
wake gloo's blocked threads in torch 2.13: measured.)
"""
from __future__ import annotations

import ctypes
import time
from datetime import timedelta
from typing import Optional

import torch.distributed as dist

__all__ = ["CollectiveError", "missing_ranks", "store_rendezvous", "abandon_group", "PROBE_SECONDS"]

PROBE_SECONDS = 5.0


class CollectiveError(RuntimeError):
    """A collective failed or timed out; the message names it and the ranks that never joined."""


def _store() -> Optional[dist.Store]:
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, AttributeError, ValueError):
        return None


def missing_ranks(seq: int, rank: int, world_size: int, probe_s: float = PROBE_SECONDS,
                  group_tag: str = "world") -> Optional[list[int]]:
    """Group ranks of the group that neither reached collective ``seq`` nor failed in a collective of
    their own within ``probe_s`` (the dead or stuck ones); None if unknowable.

    A survivor can fail in an earlier collective than this rank (a point-to-point exchange
    with the dead rank, say): it is waiting on the same culprit, so it is not named.
    ``group_tag`` names the group in the store keys (see [Note: naming the missing rank]).
    """
    store = _store()
    if store is None:
        return None
    prefix = f"sharded_fused_adam/{group_tag}/reached/{seq}/"
    failed = f"sharded_fused_adam/{group_tag}/failed/"
    try:
        store.set(prefix + str(rank), "1")
        store.set(failed + str(rank), str(seq))
        deadline = time.monotonic() + probe_s
        while True:
            missing = [r for r in range(world_size)
                       if not store.check([prefix + str(r)]) and not store.check([failed + str(r)])]
            if not missing or time.monotonic() >= deadline:
                return missing
            time.sleep(0.05)
    except (RuntimeError, ValueError):  # the store itself is gone (its host died)
        return None


_abandoned: set[int] = set()


def abandon_group(group: Optional[dist.ProcessGroup]) -> None:
    """Make sure ``group`` (None: the default group) is never destroyed (see [Note: abandoning a failed group])."""
    try:
        pg = group if group is not None else dist.distributed_c10d._get_default_group()
    except (RuntimeError, ValueError):  # already destroyed: nothing left to join
        return
    if id(pg) not in _abandoned:
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(pg))  # never released: the object (and id) stay valid
        _abandoned.add(id(pg))


def collective_error(what: str, seq: int, rank: int, world_size: int, timeout_s: Optional[float],
                     started: float, cause: BaseException,
                     group: Optional[dist.ProcessGroup] = None) -> CollectiveError:
    """Build the error for collective ``seq`` (``what``) that failed on ``rank`` of ``group``; abandons the group."""
    abandon_group(group)
    elapsed = time.monotonic() - started
    members = _global_ranks(group, world_size)
    missing = missing_ranks(seq, rank, world_size, group_tag=",".join(map(str, members)))
    if missing is None:
        who = "could not tell which rank is missing (the rendezvous store is unreachable too)"
    elif missing:
        who = f"global rank(s) {[members[r] for r in missing]} never reached it: they died or are stuck elsewhere"
    else:
        who = "every rank reached it, so the transport itself failed"
    limit = (f"collective_timeout={timeout_s:g} s" if timeout_s is not None
             else "the process group's timeout (set ShardedFusedAdam(collective_timeout=...) to bound it)")
    return CollectiveError(f"{what} (collective #{seq}) failed on global rank {members[rank]} (rank {rank} of "
                           f"{world_size} in the group of global ranks {members}) after {elapsed:.1f} s; {who}. "
                           f"Waiting is bounded by {limit}. Cause: {cause}")


def _global_ranks(group: Optional[dist.ProcessGroup], world_size: int) -> list[int]:
    """The group's global ranks, by group rank (its own numbering if torch can no longer tell)."""
    try:
        return dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
    except (RuntimeError, ValueError, AttributeError):
        return list(range(world_size))


def store_rendezvous(key: str, rank: int, world_size: int, timeout_s: float) -> Optional[list[int]]:
    """Mark ``rank`` as arrived at ``key`` and wait up to ``timeout_s`` for every rank.

    Returns the ranks that never arrived (empty: all did), or None if there is no store to
    ask. On a timeout this rank's own mark is withdrawn, so a later, complete call under
    the same key still matches.
    """
    store = _store()
    if store is None or world_size == 1:
        return [] if world_size == 1 else None
    prefix = f"sharded_fused_adam/rendezvous/{key}/"
    keys = [prefix + str(r) for r in range(world_size)]
    try:
        store.set(keys[rank], "1")
        try:
            store.wait(keys, timedelta(seconds=timeout_s))
            return []
        except RuntimeError:  # timed out: name who is missing, withdraw our mark
            missing = [r for r in range(world_size) if not store.check([keys[r]])]
            store.delete_key(keys[rank])
            return missing or []
    except (RuntimeError, ValueError):
        return None

"""``state_dict()`` on one rank alone: the other ranks' shards are served by a thread of theirs.

[Note: served state dicts]
The Hugging Face Trainer and nanoGPT save the optimizer from one rank only
(``if master_process: torch.save({"optimizer": optimizer.state_dict()})``), while every other
rank goes on to its next forward and backward, where it blocks in a collective (DDP's
all-reduce, or ours) that needs the saving rank. A gathering collective cannot work there,
and torch's ``ZeroRedundancyOptimizer`` and FSDP both require every rank. Here each rank of
a gloo group runs one daemon thread, the server, that answers a request by sending this
rank's state shards point-to-point to the rank that asked:

* the asking rank posts a request per peer in the rendezvous store
  (``<prefix>/inbox/<peer>/<n>``), waits up to ``state_dict_timeout`` for each peer's
  acknowledgement (a peer that never answers is named in a ``CollectiveError``), then
  receives each stepped bucket's state shards in the order ``gather_state_dict`` assembles
  them, on a tag of its own request (so an abandoned request never crosses a later one);
* the shards a server sends are consistent with the asking rank's: while that rank is
  inside ``state_dict()`` no peer can finish another ``step()``, because every step's
  reduce or statistics need a collective with it;
* the server polls the store every ``POLL_S`` and stops when its optimizer is collected or
  the store goes away; each request is sent from a thread of its own, so ranks that ask at
  the same time never wait on each other in a cycle;
* when every rank calls ``state_dict()`` (Accelerate, DeepSpeed, DCP, a script's last save)
  the calls meet in the store within ``GRACE_S`` and run the gathering collective as before;
  only a call that finds some rank missing is served. A served call returns only when no
  peer is inside a call at the same optimizer version and its own sends are out, for
  ``GRACE_S`` in a row: a rank that returned and exited first would cut the slower ones off. A rank alone thus pays about 2 x ``GRACE_S``
  per save. A rank that asks after its peers exited (a save after the others left the
  training loop) gets the error above, naming them.

Other backends (NCCL, HCCL) keep the gathering collective (every rank calls ``state_dict()``,
or ``snapshot_state_dict()`` on every rank first): their collectives may not be interleaved
with point-to-point transfers from another thread.
"""
from __future__ import annotations

import threading
import time
import weakref
from datetime import timedelta
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from ..comm.failures import CollectiveError, _store
from ..comm.plans import CommPlan
from ..core.bucket import Bucket

__all__ = ["ShardServer", "POLL_S", "GRACE_S", "served_or_none"]

POLL_S = 0.2  # a few store round trips per second per rank while idle; a served save waits up to this
GRACE_S = 2.0  # how long the ranks' state_dict() calls wait for each other before one is served
_INSTANCES: dict[str, int] = {}  # servers built per group in this process: the same count on every rank
_TAG_BASE = 1 << 29  # above the tags of our own send/recv plan and of users' tag 0


def _backend_is_gloo(plan: CommPlan) -> bool:
    try:
        return dist.get_backend(plan.group) == "gloo"
    except (RuntimeError, ValueError):
        return False


class ShardServer:
    """Serves this rank's shards to a rank that builds a state dict alone (see [Note: served state dicts]).

    Args:
        owner: the optimizer; the server thread stops when it is collected.
        plan: its comm plan (the group, this rank, the world size).
        buckets: its bucket list (the same list object, so buckets added later are served).
        timeout_s: how long an asking rank waits for each peer to acknowledge.
    """

    def __init__(self, owner: Any, plan: CommPlan, buckets: Sequence[Bucket], timeout_s: float):
        self._plan, self._buckets, self._timeout_s = plan, buckets, timeout_s
        self._store = _store()
        self.active = plan.world_size > 1 and self._store is not None and _backend_is_gloo(plan)
        _INSTANCES[plan.tag] = _INSTANCES.get(plan.tag, 0) + 1  # optimizers are built on every rank in turn
        self._prefix = f"sharded_fused_adam/served/{plan.tag}/{_INSTANCES[plan.tag]}"
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._served = 0  # requests picked up from the inbox
        self._sending = 0  # of which still being sent
        self._calls: tuple[int, int] = (-1, 0)  # (optimizer version, state_dict() calls at it)
        if self.active:
            # a connection of its own: a store client is not safe to share between threads
            self._thread_store = self._store.clone()
            weakref.finalize(owner, self._stop.set)
            threading.Thread(target=self._serve_forever, name=f"sharded_fused_adam-served-r{plan.rank}",
                             daemon=True).start()

    def _global(self, group_rank: int) -> int:
        return dist.get_global_rank(self._plan.group if self._plan.group is not None else dist.group.WORLD,
                                    group_rank)

    # ---- the asking rank -----------------------------------------------------------------
    def state_dict(self, version: int, rank0_only: bool, gather: Callable[[Any], dict]) -> dict:
        """This rank's ``state_dict()``: gathered if every rank calls it, else served.

        The ranks' n-th calls at one optimizer version meet in the store. If all arrive within
        ``GRACE_S``, the gathering collective runs (as it always did); otherwise the call is
        served (a rank alone, or ranks that came late, read the same decision). A served call
        returns only when no peer is inside a call at this version and none came for ``GRACE_S``.
        """
        calls = self._calls[1] + 1 if self._calls[0] == version else 1
        self._calls = (version, calls)
        key, me = f"{self._prefix}/call/{version}/{calls}", self._plan.rank
        self._store.add(f"{self._prefix}/started/{version}/{me}", 1)
        self._store.set(f"{key}/arrived/{me}", "1")
        try:
            self._store.wait([f"{key}/arrived/{r}" for r in range(self._plan.world_size)],
                             timedelta(seconds=GRACE_S))
            everyone = True
        except RuntimeError:
            everyone = False
        mode = self._store.compare_set(f"{key}/mode", "", "gathered" if everyone else "served").decode()
        try:
            if mode == "gathered":
                return gather(None)
            return {} if rank0_only and me != 0 else gather(self.request())
        finally:
            self._store.add(f"{self._prefix}/finished/{version}/{me}", 1)
            if mode != "gathered":
                self._wait_for_peers(version)

    def _wait_for_peers(self, version: int) -> None:
        """Until no peer is inside a ``state_dict()`` call at ``version`` (a rank that returned and
        exited would cut it off), our sends are out, and that lasted ``GRACE_S`` (a peer may be
        just about to call: its calls need not line up with ours by count). Bounded."""
        counts = {what: [f"{self._prefix}/{what}/{version}/{r}" for r in range(self._plan.world_size)]
                  for what in ("started", "finished")}
        deadline = quiet_since = time.monotonic()
        deadline += 2 * (GRACE_S + self._timeout_s)  # a peer's whole call: meeting, acks, transfer
        while time.monotonic() < deadline:
            started = [int(self._store.add(k, 0)) for k in counts["started"]]
            finished = [int(self._store.add(k, 0)) for k in counts["finished"]]
            with self._lock:
                busy = self._sending > 0 or any(s > f for s, f in zip(started, finished))
            if busy:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= GRACE_S:
                return
            time.sleep(POLL_S)

    def request(self) -> Callable[[int, str, torch.Tensor], None]:
        """Ask every peer for its shards; return the ``fill`` for ``gather_state_dict``.

        Raises:
            CollectiveError: a peer did not acknowledge within ``timeout_s``.
        """
        plan, store = self._plan, self._store
        request = int(store.add(f"{self._prefix}/requests", 1))
        peers = [r for r in range(plan.world_size) if r != plan.rank]
        for peer in peers:
            slot = int(store.add(f"{self._prefix}/inbox/{peer}", 1))
            store.set(f"{self._prefix}/inbox/{peer}/{slot}", f"{plan.rank} {request}")
        acks = [f"{self._prefix}/ack/{request}/{peer}" for peer in peers]
        try:
            store.wait(acks, timedelta(seconds=self._timeout_s))
        except RuntimeError:
            missing = [peer for peer, key in zip(peers, acks) if not store.check([key])]
            raise CollectiveError(
                f"state_dict() on rank {plan.rank} alone asked every rank for its optimizer shards, but "
                f"rank(s) {missing} did not answer within {self._timeout_s:g} s (state_dict_timeout): their "
                "process died, exited, or holds the GIL in a long native call. Their shards are only on them; "
                "save when every rank is alive (or call opt.state_dict() on every rank).") from None
        tag = _TAG_BASE + request % _TAG_BASE
        timeout = plan.timeout

        def fill(bucket_index: int, key: str, full: torch.Tensor) -> None:
            layout = self._buckets[bucket_index].layout
            for peer in peers:
                start, end = layout.shard_range(peer)
                piece = full.narrow(0, start, end - start)
                work = dist.irecv(piece, src=self._global(peer), group=plan.group, tag=tag)
                if timeout is not None:  # collective_timeout; else the group's own
                    work.wait(timeout)
                else:
                    work.wait()
        return fill

    # ---- the serving thread ----------------------------------------------------------------
    def _serve_forever(self) -> None:
        store = self._thread_store
        while not self._stop.is_set():
            key = f"{self._prefix}/inbox/{self._plan.rank}/{self._served + 1}"
            try:
                if not store.check([key]):
                    time.sleep(POLL_S)
                    continue
                asking, request = (int(x) for x in store.get(key).decode().split())
                store.delete_key(key)
                store.set(f"{self._prefix}/ack/{request}/{self._plan.rank}", "1")
                with self._lock:
                    self._served, self._sending = self._served + 1, self._sending + 1
                # one thread per request: ranks asking at once each receive from every peer in
                # turn, so serving them one after another could wait in a cycle
                threading.Thread(target=self._send_shards, args=(asking, _TAG_BASE + request % _TAG_BASE),
                                 daemon=True).start()
            except (RuntimeError, ValueError, dist.DistBackendError):
                return  # the store or the group is gone: the job is ending

    @torch.no_grad()
    def _send_shards(self, asking: int, tag: int) -> None:
        dst = self._global(asking)
        try:
            for bucket in list(self._buckets):
                if not any(s > 0 for s in bucket.steps):
                    continue  # the asking rank skips buckets that never stepped (gather_state_dict)
                for shard in bucket.state_shards().values():
                    dist.send(shard.contiguous(), dst=dst, group=self._plan.group, tag=tag)
        except (RuntimeError, dist.DistBackendError):
            pass  # the asking rank gave up or died: it raised there, nothing is left to serve
        finally:
            with self._lock:
                self._sending -= 1


def served_or_none(owner: Any, plan: CommPlan, buckets: Sequence[Bucket], timeout_s: float) -> Optional[ShardServer]:
    """A running ``ShardServer`` where the group allows one (gloo, several ranks), else None."""
    server = ShardServer(owner, plan, buckets, timeout_s)
    return server if server.active else None

"""The only module that issues collectives; a ``CommPlan`` holds the process group and issues them.

[Note: collective choice]
A ZeRO step needs the sum of every rank's gradient on the rank that owns each shard, and
every rank's updated shard on every rank. Which collectives do that fastest depends on the
backend, so we chose by measurement (``benchmarks/comm_bench.py`` reproduces it):

* NCCL / HCCL: ``reduce_scatter_tensor`` + in-place ``all_gather_into_tensor`` on buffers
  padded to a multiple of the world size (HCCL requires the exact multiple). Same bytes on
  the wire as DDP's all-reduce.
* gloo: its ``reduce_scatter_tensor`` and ``all_gather_into_tensor`` are slower than an
  ``all_reduce`` of the whole buffer, but its point-to-point messages are fast. So gloo gets
  ``SendRecv`` (see [Note: send/recv exchange]): the same two halves built from ``isend`` /
  ``irecv``, at DDP's volume. Medians on this 2-core machine, 16.8M fp32, one thread per rank,
  interleaved: 2 ranks: ``SendRecv`` reduce 24.0 + gather 16.5 = 40.5 ms, against
  ``all_reduce`` 46.6 + one ``broadcast`` per owner 20.2 = 66.7 ms (``AllReduceBroadcast``,
  the previous gloo choice: 1.5x DDP's bytes) and ``reduce_scatter_tensor`` 86.8 +
  ``all_gather_into_tensor`` 76.1 = 162.9 ms; DDP's ``all_reduce`` alone is 46.6 ms.
  3 ranks: 49.0 + 32.5 = 81.5 ms against 80.8 + 35.0 = 115.8 ms and 153.7 + 114.3 = 268.0 ms.

``comm="auto"`` picks by backend; ``"scatter_gather"``, ``"allreduce_broadcast"`` and
``"send_recv"`` force one.
All reductions are SUMs: the optimizer divides by the world size on its own shard, which is
exact for power-of-two world sizes and sidesteps HCCL's emulated AVG (SUM then divide).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist

from .failures import CollectiveError, collective_error

__all__ = [
    "Pending",
    "CommPlan",
    "ScatterGather",
    "AllReduceBroadcast",
    "SendRecv",
    "CommCounter",
    "choose_comm_plan",
    "check_reduction_dtypes",
    "COMM_PLANS",
    "CollectiveError",
]

ProcessGroup = Optional[dist.ProcessGroup]


class Pending:
    """An in-flight collective; ``wait()`` returns the tensor holding the result.

    A failure or a timeout while waiting becomes a ``CollectiveError`` naming the
    collective and the ranks that never joined it (see [Note: naming the missing rank]).
    """

    __slots__ = ("_works", "_result", "_plan", "_what", "_seq", "_started", "_then")

    def __init__(self, works: Sequence[dist.Work], result: torch.Tensor | None,
                 plan: "CommPlan | None" = None, what: str = "", seq: int = 0,
                 then: Optional[Callable[[], None]] = None):
        self._works = list(works)
        self._result = result
        self._plan, self._what, self._seq = plan, what, seq
        self._started = time.monotonic()
        self._then = then  # local work that turns the finished transfers into the result

    def done(self) -> bool:
        """Whether every transfer has finished (``wait()`` would not block on the wire)."""
        return all(work.is_completed() for work in self._works)

    def wait(self) -> torch.Tensor | None:
        try:
            for work in self._works:
                if self._plan is not None and self._plan.timeout is not None:
                    if self._plan.backend == "hccl":
                        _wait_polled(work, self._plan.timeout)
                    else:
                        work.wait(self._plan.timeout)
                else:
                    work.wait()
        except RuntimeError as exc:
            plan = self._plan
            timeout_s = plan.timeout.total_seconds() if plan.timeout is not None else None
            raise collective_error(self._what, self._seq, plan.rank, plan.world_size, timeout_s,
                                   self._started, exc, plan.group) from exc
        self._works = []
        if self._then is not None:
            then, self._then = self._then, None
            then()
        return self._result


def _wait_polled(work: dist.Work, timeout: timedelta) -> None:
    """Wait for ``work`` on the host for at most ``timeout``, asking ``is_completed()``.

    [Note: bounded waits on HCCL]
    ``WorkHCCL::wait(timeout)`` blocks the host only when ``TORCH_HCCL_BLOCKING_WAIT=1`` was
    set before the group was built; otherwise it makes the stream wait and returns, and the
    timeout bounds nothing. So on HCCL ``collective_timeout`` is enforced here, by polling
    (with back-off up to 10 ms), and the final ``wait()`` only orders the stream.
    """
    deadline = time.monotonic() + timeout.total_seconds()
    pause = 1e-4
    while not work.is_completed():
        if time.monotonic() > deadline:
            raise RuntimeError(f"HCCL collective not completed within {timeout.total_seconds():g} s "
                               "(polled: see [Note: bounded waits on HCCL])")
        time.sleep(pause)
        pause = min(2 * pause, 0.01)
    work.wait()


@dataclass
class CommCounter:
    """Bytes handed to each kind of collective since the last ``reset`` (payload, not wire
    bytes), and the running count of collectives issued (the same on every rank)."""

    bytes_by_op: dict = field(default_factory=dict)
    issued: int = 0

    def add(self, op: str, tensor: torch.Tensor) -> None:
        self.bytes_by_op[op] = self.bytes_by_op.get(op, 0) + tensor.numel() * tensor.element_size()

    def reset(self) -> None:
        self.bytes_by_op.clear()  # in place: a sibling counter (``sibling``) shares the dict

    def sibling(self) -> "CommCounter":
        """A counter for another group's plan: the same byte tally, its own sequence numbers
        (each group's members issue the same collectives of that group, see [Note: topology])."""
        return CommCounter(self.bytes_by_op)

    @property
    def total(self) -> int:
        return sum(self.bytes_by_op.values())


@dataclass(frozen=True)
class CommPlan:
    """How gradients reach shard owners (``reduce``) and shards reach every rank (``gather``).

    Subclasses are the strategies of [Note: collective choice]; this base is the single-rank
    plan, which moves nothing. ``timeout`` bounds every wait (None: the group's timeout).
    """

    group: ProcessGroup  # None means the default group (never a strong ref to it: see below)
    rank: int
    world_size: int
    counter: CommCounter
    timeout: Optional[timedelta] = None
    backend: str = "local"  # the group's backend name for this device ("gloo", "nccl", "hccl", ...)
    replicate: Optional["CommPlan"] = None  # hybrid sharding: the group each shard is summed over next
    model_parallel: Optional["CommPlan"] = None  # the peers that agree on the step's global facts too
    name = "local"
    reduce_needs_output = False  # whether ``reduce`` writes into a separate shard-sized buffer

    # Holding dist.group.WORLD itself would keep a destroyed group alive until interpreter
    # exit, where tearing down gloo's threads aborts the process; torch reads group=None as
    # the default group, so that is what we keep for it.

    @property
    def moves_nothing(self) -> bool:
        """One rank: reductions and gathers are no-ops, so gradients may land in place."""
        return self.world_size == 1 and self.replicate is None

    @property
    def divisor(self) -> int:
        """The number of ranks whose gradients are summed: shard x replicate (see [Note: topology])."""
        return self.world_size * (self.replicate.world_size if self.replicate is not None else 1)

    def _src(self, group_rank: int) -> int:
        return dist.get_global_rank(self.group if self.group is not None else dist.group.WORLD, group_rank)

    def _issue(self, what: str, launch: Callable[[], Sequence[dist.Work]], result: torch.Tensor | None,
               then: Optional[Callable[[], None]] = None) -> Pending:
        """Start one logical collective (one or more works) under a sequence number; ``then``
        runs once after they all finished, inside ``wait()``."""
        self.counter.issued += 1
        seq, started = self.counter.issued, time.monotonic()
        try:
            works = launch()
        except RuntimeError as exc:
            timeout_s = self.timeout.total_seconds() if self.timeout is not None else None
            raise collective_error(what, seq, self.rank, self.world_size, timeout_s, started, exc, self.group) from exc
        return Pending(works, result, self, what, seq, then)

    # Small blocking collectives for per-step scalars and coordination (no-ops on one rank).
    def all_reduce_(self, tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM,
                    what: str = "all-reduce of step statistics") -> torch.Tensor:
        """In-place all-reduce of a small tensor."""
        if self.world_size > 1:
            self._issue(what, lambda: [dist.all_reduce(tensor, op=op, group=self.group, async_op=True)],
                        tensor).wait()
        return tensor

    def all_reduce_stats(self, local: torch.Tensor, norm_type: float) -> torch.Tensor:
        """Combine per-rank gradient statistics: MAX for the inf-norm, else SUM (precision.local_stats).

        ``local`` is ``[non-finite flag, norm piece, has_grad...]``. Replicas hold the same
        shards, so only replica 0's norm piece counts, while flags and the has-grad mask are
        combined over every data-parallel rank; model-parallel peers then combine the flag
        and the norm piece only (their params differ: see [Note: topology]).
        """
        op = dist.ReduceOp.MAX if norm_type == float("inf") else dist.ReduceOp.SUM
        if self.replicate is not None and self.replicate.rank != 0:
            local[1] = 0.0
        self.all_reduce_(local, op, "all-reduce of step statistics")
        if self.replicate is not None:
            self.replicate.all_reduce_(local, op, "all-reduce of step statistics across replicas")
        if self.model_parallel is not None:
            facts = local[:2].clone()
            self.model_parallel.all_reduce_(facts, op, "all-reduce of step statistics across model-parallel ranks")
            local[:2] = facts
        return local

    def broadcast_(self, tensor: torch.Tensor, src_rank: int = 0, what: str = "broadcast") -> torch.Tensor:
        """In-place broadcast from group rank ``src_rank``."""
        if self.world_size > 1:
            self._issue(what, lambda: [dist.broadcast(tensor, src=self._src(src_rank), group=self.group,
                                                      async_op=True)], tensor).wait()
        return tensor

    def any_rank(self, flag: bool, device: torch.device, what: str = "agreement on pending gradients") -> bool:
        """Whether ``flag`` is true on any rank (a MAX all-reduce)."""
        if self.world_size == 1 and self.replicate is None:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        self.all_reduce_(t, dist.ReduceOp.MAX, what)
        if self.replicate is not None:  # replicas must take the same branch (collectives follow)
            self.replicate.all_reduce_(t, dist.ReduceOp.MAX, what + " across replicas")
        return bool(t.item() > 0)

    def all_gather_object(self, obj: object, what: str = "all-gather of objects") -> list:
        """Every rank's ``obj`` (pickled; for small, rare exchanges such as error reports)."""
        if self.world_size == 1:
            return [obj]
        out: list = [None] * self.world_size
        self.counter.issued += 1
        dist.all_gather_object(out, obj, group=self.group)
        return out

    @property
    def tag(self) -> str:
        """Names the group in rendezvous-store keys: its global ranks."""
        if self.world_size == 1:
            return "local"
        group = self.group if self.group is not None else dist.group.WORLD
        return ",".join(str(r) for r in dist.get_process_group_ranks(group))

    def barrier(self, device: torch.device, what: str = "barrier") -> None:
        """Wait for every rank (an all-reduce of one element: works on every backend)."""
        if self.world_size > 1:
            self.all_reduce_(torch.zeros(1, device=device), what=what)

    def all_reduce(self, flat: torch.Tensor, what: str = "gradients") -> Pending:
        """Start summing all of ``flat`` over ranks in place (replicated gradients, any backend)."""
        if self.world_size == 1:
            return Pending([], flat)
        self.counter.add("all_reduce", flat)
        return self._issue(f"all_reduce of {what} ({_mb(flat)})", lambda: [dist.all_reduce(
            flat, op=dist.ReduceOp.SUM, group=self.group, async_op=True)], flat)

    def reduce(self, flat: torch.Tensor, shard_out: torch.Tensor | None, what: str = "gradients") -> Pending:
        """Start summing ``flat`` over ranks; ``wait()`` gives this rank's summed shard.

        ``shard_out``: a shard-sized buffer of ``flat``'s dtype the plan may write into until
        ``wait()`` returns (required where ``reduce_needs_output``), or None."""
        return Pending([], flat)

    def gather(self, flat: torch.Tensor, what: str = "params") -> Pending:
        """Start filling every rank's copy of ``flat`` with each owner's shard."""
        return Pending([], None)

    def receive_buffer_bytes(self) -> int:
        """Bytes this plan keeps for receiving (pooled between collectives); none here."""
        return 0

    def release_buffers(self) -> None:
        """Drop the pooled receive buffers (between steps, so activations can reuse the memory)."""

    def own_shard(self, flat: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a padded flat buffer."""
        shard_numel = flat.numel() // self.world_size
        return flat.narrow(0, self.rank * shard_numel, shard_numel)


def _mb(t: torch.Tensor) -> str:
    return f"{t.numel() * t.element_size() / 2**20:.1f} MiB"


# torch 2.13 deprecates reduce_scatter_tensor / all_gather_into_tensor for these (same arguments).
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
_ALL_GATHER = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)


class ScatterGather(CommPlan):
    """``reduce_scatter_tensor`` + in-place ``all_gather_into_tensor`` (NCCL, HCCL)."""

    name = "scatter_gather"
    reduce_needs_output = True

    def reduce(self, flat: torch.Tensor, shard_out: torch.Tensor | None, what: str = "gradients") -> Pending:
        assert shard_out is not None and shard_out.numel() * self.world_size == flat.numel()
        self.counter.add("reduce_scatter", flat)
        return self._issue(f"reduce_scatter of {what} ({_mb(flat)})", lambda: [_REDUCE_SCATTER(
            shard_out, flat, op=dist.ReduceOp.SUM, group=self.group, async_op=True)], shard_out)

    def gather(self, flat: torch.Tensor, what: str = "params") -> Pending:
        self.counter.add("all_gather", flat)
        return self._issue(f"all_gather of {what} ({_mb(flat)})", lambda: [_ALL_GATHER(
            flat, self.own_shard(flat), group=self.group, async_op=True)], None)


class AllReduceBroadcast(CommPlan):
    """``all_reduce`` keeping the own slice + one ``broadcast`` per shard owner (gloo)."""

    name = "allreduce_broadcast"

    def reduce(self, flat: torch.Tensor, shard_out: torch.Tensor | None, what: str = "gradients") -> Pending:
        self.counter.add("all_reduce", flat)
        return self._issue(f"all_reduce of {what} ({_mb(flat)})", lambda: [dist.all_reduce(
            flat, op=dist.ReduceOp.SUM, group=self.group, async_op=True)], self.own_shard(flat))

    def gather(self, flat: torch.Tensor, what: str = "params") -> Pending:
        self.counter.add("broadcast", flat)
        shard_numel = flat.numel() // self.world_size

        def launch() -> list[dist.Work]:
            return [dist.broadcast(flat.narrow(0, r * shard_numel, shard_numel), src=self._src(r),
                                   group=self.group, async_op=True) for r in range(self.world_size)]

        return self._issue(f"broadcasts of {what} ({_mb(flat)})", launch, None)


@dataclass(frozen=True)
class SendRecv(CommPlan):
    """Reduce-scatter and all-gather as direct ``isend``/``irecv`` exchanges (gloo).

    [Note: send/recv exchange]
    gloo moves point-to-point messages at close to memory speed, while its
    ``reduce_scatter_tensor`` and ``all_gather_into_tensor`` are slower than an
    ``all_reduce`` of the whole buffer. So: for the reduction each rank sends chunk ``c`` of
    the padded buffer to its owner ``c`` and receives its own chunk from every peer, then
    sums the contributions into its own chunk of the buffer in group-rank order
    (deterministic, and for two ranks bitwise what any all-reduce gives); for the gather each
    rank sends its shard to every peer and receives theirs in place. Per rank that is
    ``(N-1)/N`` of the buffer out and in for each half: DDP's all-reduce volume for the pair.
    Every message is posted when the collective starts, so nothing waits for Python until
    ``wait()``. The chunks received for a reduction need ``N-1`` shard-sized buffers while it
    is in flight; they are pooled (``receive_buffer_bytes``), because a fresh one per
    reduction costs page faults: on 2 ranks here a 16.8M fp32 reduction took 41 ms of CPU
    with fresh buffers against 23 ms pooled. Messages carry the collective's sequence number
    as their tag (the same on every rank), so any number of them in flight, and a user's
    own ``send``/``recv`` on tag 0, never cross.
    """

    _free: dict = field(default_factory=dict, repr=False, compare=False)  # (numel, dtype) -> buffers
    name = "send_recv"

    def _tag(self) -> int:
        return self.counter.issued % 2**31  # inside ``launch``: this collective's sequence number

    def _take(self, like: torch.Tensor) -> torch.Tensor:
        free = self._free.get((like.numel(), like.dtype, like.device))
        return free.pop() if free else torch.empty_like(like)

    def _give(self, buffers: Sequence[torch.Tensor]) -> None:
        for buf in buffers:
            self._free.setdefault((buf.numel(), buf.dtype, buf.device), []).append(buf)

    def receive_buffer_bytes(self) -> int:
        """Bytes held in pooled receive buffers."""
        return sum(b.numel() * b.element_size() for bufs in self._free.values() for b in bufs)

    def release_buffers(self) -> None:
        self._free.clear()

    def reduce(self, flat: torch.Tensor, shard_out: torch.Tensor | None, what: str = "gradients") -> Pending:
        self.counter.add("reduce_scatter", flat)
        shard_numel, rank, world_size = flat.numel() // self.world_size, self.rank, self.world_size
        own = flat.narrow(0, rank * shard_numel, shard_numel)
        peers = [r for r in range(world_size) if r != rank]
        # A shard-sized ``shard_out`` (the caller's empty gradient shard) receives the first peer's
        # chunk: one pooled buffer fewer per reduction in flight.
        lent = [shard_out] if shard_out is not None and peers and shard_out.dtype == own.dtype else []
        received = lent + [self._take(own) for _ in peers[len(lent):]]
        contributions = list(received)  # contributions[r]: rank r's values of this rank's chunk
        contributions.insert(rank, own)

        def launch() -> list[dist.Work]:
            tag, group = self._tag(), self.group
            works = [dist.irecv(contributions[r], src=self._src(r), group=group, tag=tag) for r in peers]
            works += [dist.isend(flat.narrow(0, r * shard_numel, shard_numel), dst=self._src(r), group=group,
                                 tag=tag) for r in peers]
            return works

        def add_up() -> None:
            # ((c0 + c1) + c2) + ...: ``own`` is only overwritten by the last add unless it is c0.
            acc = contributions[0]
            for r in range(1, world_size - 1):
                acc.add_(contributions[r])
            torch.add(acc, contributions[-1], out=own)
            self._give(received[len(lent):])

        return self._issue(f"send/recv reduce-scatter of {what} ({_mb(flat)})", launch, own, add_up)

    def gather(self, flat: torch.Tensor, what: str = "params") -> Pending:
        self.counter.add("all_gather", flat)
        shard_numel, rank = flat.numel() // self.world_size, self.rank
        peers = [r for r in range(self.world_size) if r != rank]

        def launch() -> list[dist.Work]:
            tag, group, own = self._tag(), self.group, self.own_shard(flat)
            works = [dist.irecv(flat.narrow(0, r * shard_numel, shard_numel), src=self._src(r), group=group,
                                tag=tag) for r in peers]
            works += [dist.isend(own, dst=self._src(r), group=group, tag=tag) for r in peers]
            return works

        return self._issue(f"send/recv all-gather of {what} ({_mb(flat)})", launch, None)


_PLANS = {cls.name: cls for cls in (ScatterGather, AllReduceBroadcast, SendRecv)}
COMM_PLANS = ("auto", "scatter_gather", "allreduce_broadcast", "send_recv")


def _backend_for(group: ProcessGroup, device: torch.device) -> str:
    backend = str(dist.get_backend(group))
    # Multi-device default groups report e.g. "cpu:gloo,cuda:nccl".
    for part in backend.split(","):
        if ":" in part:
            dev, name = part.split(":", 1)
            if dev == device.type:
                return name
    return backend


def choose_comm_plan(
    group: ProcessGroup, device: torch.device, requested: str, counter: CommCounter,
    timeout: Optional[timedelta] = None,
) -> CommPlan:
    """The collectives for ``group`` and tensors on ``device`` (see [Note: collective choice]).

    ``group=None`` means the default group if torch.distributed is initialized, else a
    single rank with no communication at all.

    Raises:
        ValueError: ``requested`` is not one of ``COMM_PLANS``.
    """
    if requested not in COMM_PLANS:
        raise ValueError(f"comm must be one of {COMM_PLANS}, got {requested!r}")
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return CommPlan(None, 0, 1, counter)
    if group is dist.group.WORLD:
        group = None
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    backend = _backend_for(group, device)
    if world_size == 1:
        return CommPlan(group, rank, world_size, counter, timeout, backend)
    name = requested
    if name == "auto":
        name = "send_recv" if backend == "gloo" else "scatter_gather"
    return _PLANS[name](group, rank, world_size, counter, timeout, backend)


def check_reduction_dtypes(plan: CommPlan, dtypes: Sequence[torch.dtype]) -> None:
    """Refuse at construction what the backend cannot reduce (HCCL: no float64, but on Ascend950).

    Raises:
        ValueError: a float64 param or reduce dtype with an ``hccl`` group of several ranks.
    """
    if plan.backend == "hccl" and plan.world_size > 1 and torch.float64 in dtypes:
        raise ValueError("params or reduce_dtype of dtype torch.float64 cannot be sharded over an hccl process "
                         "group: HCCL reductions reject float64 (all Ascend chips but the 950); use float32 "
                         "params, or bf16/fp16 params with fp32 masters")

"""What the optimizer holds on this rank, in bytes, next to the ZeRO formulas it should match."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .bucket import Bucket

__all__ = ["MemoryReport", "memory_report"]


def _nbytes(t) -> int:
    return 0 if t is None else t.numel() * t.element_size()


@dataclass(frozen=True)
class MemoryReport:
    """Bytes held on one rank.

    ``params``: the full flat param buffers (the model's own weights, padding included);
    ``padding``: the part of ``params`` that belongs to no param; ``grad_shards``: this
    rank's reduced gradient shards; ``master_shards``: fp32 masters (0 for fp32 models,
    whose shard of the flat params is the master); ``moments``: exp_avg, exp_avg_sq and
    max_exp_avg_sq shards; ``comm_buffers``: the pooled bucket buffers gradients are reduced in
    and, with gloo's send/recv reductions, the pooled shard-sized receive buffers (with
    ``grads="replicated"``: the full flat gradient buffers, whose shards are then the
    gradient shards of fp32 params and not counted twice); ``staging``: the fp32 scratch
    chunks of a staged update (split masters or bf16 moments; at most a few hundred KiB per
    bucket, see [Note: staged update] in bucket.py). ``master_shards`` counts what the master
    holds beyond the params: 4 bytes per element of a low-precision shard, 2 when split
    (plus 8 bytes per down tie, see [Note: split masters]).
    ``host_state``: the part of ``master_shards`` and ``moments`` held in host memory
    (``offload="host"``); the rest of ``total`` is on the params' device (``device_total``).
    ``num_params`` is Ψ, the number of parameter elements.
    """

    num_params: int
    world_size: int
    params: int
    padding: int
    grad_shards: int
    master_shards: int
    moments: int
    comm_buffers: int
    staging: int = 0
    host_state: int = 0

    @property
    def optimizer_state(self) -> int:
        """Masters and moments: the state a sharded optimizer exists to divide by the world size."""
        return self.master_shards + self.moments

    @property
    def total(self) -> int:
        return self.params + self.grad_shards + self.optimizer_state + self.comm_buffers + self.staging

    @property
    def device_total(self) -> int:
        """What stays on the params' device: everything but the offloaded state."""
        return self.total - self.host_state

    def bytes_per_param(self) -> dict[str, float]:
        """Each component (and the total) divided by Ψ: the table of docs/concepts.md."""
        psi = max(1, self.num_params)
        parts = ("params", "grad_shards", "master_shards", "moments", "optimizer_state", "comm_buffers",
                 "staging", "host_state", "total")
        return {k: getattr(self, k) / psi for k in parts}

    def as_dict(self) -> dict:
        return {**self.__dict__, "optimizer_state": self.optimizer_state, "total": self.total,
                "device_total": self.device_total}


def memory_report(buckets: Sequence[Bucket], world_size: int, comm_buffer_bytes: int) -> MemoryReport:
    """Add up what ``buckets`` hold on this rank (see ``MemoryReport``)."""
    params = sum(_nbytes(b.buffer.flat) for b in buckets)
    used = sum(b.layout.param_numel * b.buffer.flat.element_size() for b in buckets)
    return MemoryReport(
        num_params=sum(b.layout.param_numel for b in buckets),
        world_size=world_size,
        params=params,
        padding=params - used,
        grad_shards=sum(_nbytes(b.grad_shard) for b in buckets if b.grad_shard._base is None),  # not views
        master_shards=sum(b.master_nbytes for b in buckets),
        moments=sum(b.moment_nbytes for b in buckets),
        comm_buffers=comm_buffer_bytes,
        staging=sum({id(b.storage.scratch): b.staging_nbytes for b in buckets}.values()),  # offload shares one
        host_state=sum(b.host_nbytes for b in buckets),
    )

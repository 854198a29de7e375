"""Collectives tested without a model: every plan sums into the owner's shard and gathers back."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from sharded_fused_adam.comm.plans import AllReduceBroadcast, CommCounter, CommPlan, ScatterGather, choose_comm_plan


def _plan_rank(rank: int, world_size: int, requested: str, dtype: torch.dtype) -> dict:
    counter = CommCounter()
    plan = choose_comm_plan(dist.group.WORLD, torch.device("cpu"), requested, counter)
    shard = 48
    # small integers: exact in bf16 after summing over up to 4 ranks
    flat = (torch.arange(shard * world_size) % 8).to(dtype) * (rank + 1)
    out = torch.empty(shard, dtype=dtype) if plan.reduce_needs_output else None
    summed = plan.reduce(flat, out).wait()
    factor = world_size * (world_size + 1) // 2
    expect = (torch.arange(rank * shard, (rank + 1) * shard) % 8).to(dtype) * factor
    reduced_ok = torch.equal(summed, expect)
    params = torch.zeros(shard * world_size, dtype=dtype)
    params[rank * shard:(rank + 1) * shard] = rank + 1
    plan.gather(params).wait()
    gathered_ok = torch.equal(params, torch.arange(1, world_size + 1).to(dtype).repeat_interleave(shard))
    return dict(name=plan.name, reduced=reduced_ok, gathered=gathered_ok, bytes=dict(counter.bytes_by_op))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("requested", ["auto", "scatter_gather", "allreduce_broadcast", "send_recv"])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_reduce_then_gather(ranks, world_size, requested, dtype):
    results = ranks(_plan_rank, world_size, requested, dtype)
    expected_name = {"auto": "send_recv"}.get(requested, requested) if world_size > 1 else "local"
    nbytes = 48 * world_size * torch.empty((), dtype=dtype).element_size()
    expected_bytes = {
        "local": {},
        "allreduce_broadcast": {"all_reduce": nbytes, "broadcast": nbytes},
        "scatter_gather": {"reduce_scatter": nbytes, "all_gather": nbytes},
        "send_recv": {"reduce_scatter": nbytes, "all_gather": nbytes},
    }[expected_name]
    for r in results:
        assert r == dict(name=expected_name, reduced=True, gathered=True, bytes=expected_bytes)


def _small_collectives_rank(rank: int, world_size: int) -> tuple:
    plan = choose_comm_plan(None, torch.device("cpu"), "auto", CommCounter())
    cpu = torch.device("cpu")
    t = plan.broadcast_(torch.tensor([rank + 10.0]))
    total = plan.all_reduce_(torch.tensor([1.0]))
    plan.barrier(cpu)
    return t.item(), total.item(), plan.any_rank(rank == world_size - 1, cpu), plan.any_rank(False, cpu), plan.group


def test_small_collectives(ranks):
    # The default group is kept as None (torch's spelling of it), never as an object.
    assert ranks(_small_collectives_rank, 3) == [(10.0, 3.0, True, False, None)] * 3


def test_no_process_group_means_a_local_plan():
    plan = choose_comm_plan(None, torch.device("cpu"), "auto", CommCounter())
    assert type(plan) is CommPlan and plan.world_size == 1
    flat = torch.ones(16)
    assert plan.reduce(flat, None).wait() is flat and plan.gather(flat).wait() is None
    assert issubclass(ScatterGather, CommPlan) and issubclass(AllReduceBroadcast, CommPlan)


def _send_recv_in_flight_rank(rank: int, world_size: int) -> dict:
    counter = CommCounter()
    plan = choose_comm_plan(None, torch.device("cpu"), "send_recv", counter)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32]
    shards = [7, 48, 5, 1]  # odd sizes: the chunk boundaries fall anywhere
    flats, outs, expected, pendings = [], [], [], []
    for k, (dtype, shard) in enumerate(zip(dtypes, shards)):
        per_rank = [torch.randn(shard * world_size, generator=torch.Generator().manual_seed(100 * k + r)).to(dtype)
                    for r in range(world_size)]
        mine = per_rank[rank][rank * shard:(rank + 1) * shard]
        ref = per_rank[0][rank * shard:(rank + 1) * shard].clone()
        for r in range(1, world_size):  # the plan sums in group-rank order: bitwise, any dtype
            ref += per_rank[r][rank * shard:(rank + 1) * shard]
        expected.append(ref if world_size > 1 else mine)
        flats.append(per_rank[rank].clone())
        outs.append(torch.empty(shard, dtype=dtype))
    # Every reduction and gather in flight at once, inside a user's own tag-0 exchange whose
    # send starts before them and whose receive is posted after them.
    user, works = torch.tensor([float(rank)]), []
    if world_size > 1:
        works.append(dist.isend(user.clone(), dst=(rank + 1) % world_size))
    for flat, out in zip(flats, outs):
        pendings.append(plan.reduce(flat, out))
    params = [torch.full((s * world_size,), -1.0, dtype=d) for d, s in zip(dtypes, shards)]
    for p, s in zip(params, shards):
        p[rank * s:(rank + 1) * s] = rank + 1
        pendings.append(plan.gather(p))
    if world_size > 1:
        works.append(dist.irecv(user, src=(rank - 1) % world_size))
    for w in works:
        w.wait()
    results = [p.wait() for p in reversed(pendings)][::-1]
    reduced = [torch.equal(r, e) for r, e in zip(results[:4], expected)]
    gathered = [torch.equal(p, torch.arange(1, world_size + 1).to(p.dtype).repeat_interleave(s))
                for p, s in zip(params, shards)]
    return dict(reduced=reduced, gathered=gathered, user=user.item(), issued=counter.issued)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_send_recv_many_in_flight_sum_in_rank_order(ranks, world_size):
    results = ranks(_send_recv_in_flight_rank, world_size)
    for rank, r in enumerate(results):
        assert r["reduced"] == [True] * 4 and r["gathered"] == [True] * 4
        assert r["user"] == float((rank - 1) % world_size), "a user's send/recv crossed the plan's messages"
        assert r["issued"] == 8

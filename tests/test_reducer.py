"""GradReducer on its own (no optimizer), then through ShardedFusedAdam: shards hold the averaged
gradient, on 1 to 4 real gloo ranks."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from helpers import batch, loss_fn, make_net
from sharded_fused_adam import ShardedFusedAdam
from sharded_fused_adam.core.bucket import pack_buckets
from sharded_fused_adam.comm.plans import CommCounter, choose_comm_plan
from sharded_fused_adam.grads.reducer import GradReducer


def _setup(rank: int, bucket_cap_mb: float = 1e-3, **kwargs):
    model = make_net()
    params = list(model.parameters())
    names = [f"p{i}" for i in range(len(params))]
    group = dist.group.WORLD if dist.is_initialized() else None
    plan = choose_comm_plan(group, torch.device("cpu"), "auto", CommCounter())
    buckets = pack_buckets(params, range(len(params)), names, group_index=0, first_index=0,
                           world_size=plan.world_size, rank=plan.rank, bucket_cap_mb=bucket_cap_mb)
    reducer = GradReducer(buckets, plan, reduce_dtype=torch.float32, overlap=True, reduce=True, **kwargs)
    return model, params, buckets, plan, reducer


def _averaged(world_size: int, steps: list[int], micro: int = 1) -> list:
    """Per-param average over ranks of the sum over micro-batches, None where absent."""
    ref = make_net()
    for step in steps:
        for r in range(world_size):
            for m in range(micro):
                loss_fn(ref, *batch(10 * step + m, r, same_on_all_ranks=False)).backward()
    return [None if p.grad is None else p.grad / world_size for p in ref.parameters()]


def _shard_error(params, buckets, plan, expected) -> float:
    """Largest |shard - own slice of the expected flat gradient| over all buckets."""
    worst = 0.0
    for bucket in buckets:
        flat = torch.zeros(bucket.layout.padded_numel)
        for slot, s in zip(bucket.params, bucket.layout.slots):
            g = expected[s.index]
            if g is not None:
                flat.narrow(0, s.offset, s.numel).copy_(g.reshape(-1))
        own = plan.own_shard(flat)
        got = bucket.grad_shard if bucket.grad_valid else torch.zeros_like(own)
        worst = max(worst, (got - own).abs().max().item())
    return worst


def _backward_then_finish(rank: int, world_size: int) -> dict:
    model, params, buckets, plan, reducer = _setup(rank)
    seen = []
    model.emb.weight.register_post_accumulate_grad_hook(lambda p: seen.append(reducer.num_launched))
    errors = []
    for step in range(3):
        loss_fn(model, *batch(10 * step, rank, same_on_all_ranks=False)).backward()
        assert all(p.grad is None for p in params)  # moved into the buffers during backward
        reducer.finish()
        errors.append(_shard_error(params, buckets, plan, _averaged(world_size, [step])))
        reducer.zero_grad(set_to_none=True)
        reducer.end_step()
    unused = [b.has_grad[slot] for b in buckets for slot, p in enumerate(b.params) if p is model.unused.weight]
    return {"errors": errors, "launched_during_backward": seen, "unused_has_grad": unused,
            "num_buckets": len(buckets)}


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shards_hold_the_averaged_gradient(ranks, world_size):
    for out in ranks(_backward_then_finish, world_size):
        # 1e-7: the same values summed in another order (rank-specific gradients, |g| < 1)
        assert max(out["errors"]) < 1e-7, out["errors"]
        assert out["unused_has_grad"] == [False]
        # the first backward learns the order; later ones launch buckets while backward runs
        assert out["launched_during_backward"][0] == 0
        assert min(out["launched_during_backward"][1:]) >= out["num_buckets"] // 2


def _no_sync(rank: int, world_size: int) -> float:
    model, params, buckets, plan, reducer = _setup(rank)
    with reducer.no_sync():
        for m in range(2):
            loss_fn(model, *batch(m, rank, same_on_all_ranks=False)).backward()
    unused = {id(q) for q in model.unused.parameters()}
    assert all(p.grad is not None for p in params if id(p) not in unused)  # kept locally
    assert plan.counter.total == 0  # nothing communicated yet
    loss_fn(model, *batch(2, rank, same_on_all_ranks=False)).backward()
    reducer.finish()
    return _shard_error(params, buckets, plan, _averaged(world_size, [0], micro=3))


@pytest.mark.parametrize("world_size", [2, 3])
def test_no_sync_reduces_the_accumulated_sum_once(ranks, world_size):
    assert max(ranks(_no_sync, world_size)) < 1e-6


def _hand_set(rank: int, world_size: int) -> float:
    model, params, buckets, plan, reducer = _setup(rank)
    expected = []
    for i, p in enumerate(params):
        if i % 3 == 0:
            expected.append(None)  # never set: counts as zero, has_grad stays False
            continue
        values = [torch.full_like(p, float(r + i)) for r in range(world_size)]
        p.grad = values[rank].clone()
        expected.append(sum(values) / world_size)
    assert reducer.finish() is True  # ranks agreed there was something to reduce
    flags_ok = all(b.has_grad[slot] == (expected[s.index] is not None)
                   for b in buckets for slot, s in enumerate(b.layout.slots))
    assert flags_ok
    return _shard_error(params, buckets, plan, expected)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_hand_set_gradients_are_collected_at_finish(ranks, world_size):
    assert max(ranks(_hand_set, world_size)) == 0.0  # small integers average exactly


def _nothing(rank: int, world_size: int) -> bool:
    _, _, _, _, reducer = _setup(rank)
    return reducer.finish()


def test_finish_without_gradients_changes_nothing(ranks):
    assert ranks(_nothing, 2) == [False, False]


# ---- through the optimizer: every strategy, every dtype path, rank-specific gradients -------

def _expected_flat(bucket, expected, world_size: int, rank: int) -> torch.Tensor:
    """This rank's part of the bucket's flat averaged gradient, cut with plain arithmetic."""
    flat = torch.zeros(bucket.layout.padded_numel)
    for s in bucket.layout.slots:
        if expected[s.index] is not None:
            flat.narrow(0, s.offset, s.numel).copy_(expected[s.index].reshape(-1))
    return flat.view(world_size, -1)[rank]


def _optimizer_shards(rank: int, world_size: int, grads: str, dtype: torch.dtype, reduce_dtype: torch.dtype) -> dict:
    model = make_net().to(dtype)
    opt = ShardedFusedAdam(model.parameters(), lr=1e-2, grads=grads, reduce_dtype=reduce_dtype, bucket_cap_mb=2e-3)
    errors, scale, replicated_errors = [], 0.0, []
    for step in range(2):
        ref = make_net().to(dtype)
        ref.load_state_dict(model.state_dict())  # the params as they are now, on every rank
        params = list(ref.parameters())
        total = [torch.zeros(q.shape) for q in params]
        for r in range(world_size):  # each rank's own gradient, upcast, summed in fp32
            loss = loss_fn(ref, *batch(step, r, same_on_all_ranks=False)).float()
            for t, g in zip(total, torch.autograd.grad(loss, params, allow_unused=True)):
                if g is not None:
                    t.add_(g.float())
        unused = {id(q) for q in ref.unused.parameters()}
        expected = [None if id(q) in unused else t / world_size for q, t in zip(params, total)]
        scale = max(scale, max(g.abs().max().item() for g in expected if g is not None))
        opt.zero_grad()
        loss_fn(model, *batch(step, rank, same_on_all_ranks=False)).float().backward()
        opt.clip_grad_norm_(1e9)  # a public way to finish the reduction before the step
        for bucket in opt.shard_state().buckets:
            got = bucket.grad_shard if bucket.grad_valid else torch.zeros_like(bucket.grad_shard)
            errors.append((got.float() - _expected_flat(bucket, expected, world_size, rank)).abs().max().item())
        if grads == "replicated":  # the whole averaged gradient is in param.grad, as with DDP
            for p, g in zip(model.parameters(), expected):
                replicated_errors.append(float(p.grad is not None) if g is None
                                         else (p.grad.float() - g).abs().max().item())
        opt.step()
    return dict(error=max(errors), scale=scale, replicated=max(replicated_errors, default=0.0),
                num_buckets=len(opt.shard_state().buckets))


# Tolerances, relative to the largest averaged gradient element: fp32 sums the same values in
# another order (1e-6); fp16 reductions divide before summing in fp16 (2**-10 per rounding).
@pytest.mark.parametrize("grads,dtype,reduce_dtype,world_sizes,rel", [
    ("sharded", torch.float32, torch.float32, (2, 3), 1e-6),
    ("replicated", torch.float32, torch.float32, (2, 3), 1e-6),
    ("sharded", torch.bfloat16, torch.float32, (3,), 1e-6),
    ("sharded", torch.float16, torch.float16, (3,), 4e-3),
], ids=["sharded_fp32", "replicated_fp32", "sharded_bf16", "sharded_fp16_predivided"])
def test_optimizer_gradient_shards_are_the_average_over_ranks(ranks, grads, dtype, reduce_dtype, world_sizes, rel):
    for world_size in world_sizes:
        for out in ranks(_optimizer_shards, world_size, grads, dtype, reduce_dtype):
            assert out["num_buckets"] > 1
            # a missing 1/world_size (or a doubled one) is off by >= 1/3 of the scale: far above rel
            assert out["error"] <= rel * out["scale"], (world_size, out)
            assert out["replicated"] <= rel * out["scale"], (world_size, out)

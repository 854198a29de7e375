"""core/bucket.py on its own: one rank's shards of one bucket, without a process group.

Every rank of a world is simulated in one process: each builds its own ``Bucket`` over its own
copy of the params, takes its shard of the full gradient, and updates; stitched together, the
shards must equal torch's fused Adam over whole params (bitwise: see [Note: alignment]).
"""
from __future__ import annotations

import pytest
import torch

from sharded_fused_adam.core.bucket import Bucket
from sharded_fused_adam.core.layout import plan_buckets
from sharded_fused_adam.kernels import select_kernel
from sharded_fused_adam.kernels.rule import ADAM, MASTER_KEY

SHAPES = [(7, 3), (33,), (5, 5), (1,)]
GROUP = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, amsgrad=True, maximize=False,
             decoupled_weight_decay=True)


def _params(dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=g).to(dtype) for s in SHAPES]


def _bucket(rank: int, world_size: int, dtype: torch.dtype = torch.float32, **options) -> Bucket:
    params = _params(dtype)
    (layout,) = plan_buckets([(i, p.numel()) for i, p in enumerate(params)], world_size=world_size,
                             bucket_numel=10**6)
    return Bucket(layout, [params[s.index] for s in layout.slots], [f"p{s.index}" for s in layout.slots], 0, rank,
                  **options)


def _grads(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=g) for s in SHAPES]


def _set_grad_shard(bucket: Bucket, grads: list[torch.Tensor]) -> None:
    flat = torch.zeros(bucket.layout.padded_numel)
    for slot in bucket.layout.slots:
        flat.narrow(0, slot.offset, slot.numel).copy_(grads[slot.index].reshape(-1))
    start, end = bucket.layout.shard_range(bucket.rank)
    bucket.grad_shard.copy_(flat[start:end])


def _step(bucket: Bucket, grads: list[torch.Tensor], mask: list[bool]) -> None:
    _set_grad_shard(bucket, grads)
    bucket.ensure_amsgrad_buffer()
    segments = bucket.segments_to_update(mask)
    if segments:
        bucket.update(segments, select_kernel(None, torch.device("cpu")).adam_step, **ADAM.kernel_scalars(GROUP))
    bucket.advance_steps(mask)
    bucket.publish_master()


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_the_shards_of_every_rank_make_torch_adamw_bitwise(world_size):
    buckets = [_bucket(r, world_size) for r in range(world_size)]
    ref = [torch.nn.Parameter(p) for p in _params()]
    torch_opt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, amsgrad=True, fused=True)
    for step in range(3):
        grads = _grads(step)
        for bucket in buckets:
            _step(bucket, grads, [True] * len(SHAPES))
        for p, g in zip(ref, grads):
            p.grad = g.clone()
        torch_opt.step()
    stitched = torch.cat([b.buffer.shard(b.rank) for b in buckets])  # each rank updated its own shard only
    for slot in buckets[0].layout.slots:
        got = stitched[slot.offset:slot.offset + slot.numel]
        assert torch.equal(got, ref[slot.index].detach().reshape(-1)), slot.index


def test_a_param_without_a_gradient_keeps_its_state_and_step():
    bucket = _bucket(0, 1)
    bucket.ensure_amsgrad_buffer()
    before = {k: v.clone() for k, v in bucket.state_shards().items()}
    slot_of_absent = bucket.layout.slots[0]
    mask = [s is not slot_of_absent for s in bucket.layout.slots]
    _step(bucket, _grads(0), mask)
    assert bucket.steps == [0 if s is slot_of_absent else 1 for s in bucket.layout.slots]
    frag = next(f for f in bucket.fragments if f.slot == 0)
    for key, value in bucket.state_shards().items():
        piece = slice(frag.shard_offset, frag.shard_offset + frag.numel)
        assert torch.equal(value[piece], before[key][piece]), key


def test_state_shards_round_trip_through_load_state_with_the_rule_keys():
    bucket = _bucket(1, 2, torch.bfloat16, state_dtype=torch.bfloat16)
    _step(bucket, _grads(0), [True] * len(SHAPES))
    saved = {k: v.clone() for k, v in bucket.state_shards().items()}
    assert set(saved) == set(ADAM.keys_for(GROUP)) | {MASTER_KEY}
    assert saved[MASTER_KEY].dtype == torch.float32 and saved["exp_avg"].dtype == torch.bfloat16
    fresh = _bucket(1, 2, torch.bfloat16, state_dtype=torch.bfloat16)
    fresh.load_state(bucket.steps, {k: v.float() for k, v in saved.items()})  # loaders stage in fp32
    assert fresh.steps == bucket.steps
    for key, value in fresh.state_shards().items():
        assert torch.equal(value, saved[key]), key


def test_a_missing_master_is_rebuilt_from_the_params_and_missing_moments_are_zeros():
    bucket = _bucket(0, 1, torch.bfloat16)
    _step(bucket, _grads(0), [True] * len(SHAPES))
    bucket.load_state([3] * len(SHAPES), {})
    shards = bucket.state_shards()
    assert torch.equal(shards[MASTER_KEY], bucket.buffer.shard(0).float())
    assert all(not shards[k].any() for k in ADAM.moment_keys)
    assert bucket.steps == [3] * len(SHAPES)

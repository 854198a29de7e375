"""Pure shard math: coverage, no overlap, equal aligned shards, bounded padding, kernel segments."""
from __future__ import annotations

import pytest

from sharded_fused_adam.core.layout import ALIGN_NUMEL, BucketLayout, plan_buckets, kernel_segments


def gpt2_small_numels() -> list[int]:
    """GPT-2 small (124M): token/pos embeddings, 12 blocks, final LayerNorm (tied head)."""
    d, v, ctx = 768, 50257, 1024
    numels = [v * d, ctx * d]
    for _ in range(12):
        numels += [d, d, 3 * d * d, 3 * d, d * d, d, d, d, 4 * d * d, 4 * d, 4 * d * d, d]
    return numels + [d, d]


def check_invariants(buckets: list[BucketLayout], numels: list[int], world_size: int) -> None:
    seen = {}
    for bucket in buckets:
        assert bucket.padded_numel == bucket.shard_numel * world_size
        assert bucket.shard_numel % ALIGN_NUMEL == 0
        covered = [0] * bucket.padded_numel
        for s in bucket.slots:
            assert s.offset % ALIGN_NUMEL == 0
            assert s.index not in seen, "a param is in two buckets"
            seen[s.index] = s.numel
        for rank in range(world_size):
            lo, hi = bucket.shard_range(rank)
            assert hi - lo == bucket.shard_numel and lo % ALIGN_NUMEL == 0
            for f in bucket.fragments(rank):
                slot = bucket.slots[f.slot]
                start = slot.offset + f.param_start
                assert lo <= start and start + f.numel <= hi
                assert f.shard_offset == start - lo
                for i in range(start, start + f.numel):
                    covered[i] += 1
        for s in bucket.slots:  # every element of every param is owned by exactly one rank
            assert all(c == 1 for c in covered[s.offset:s.end]), s
        gaps = bucket.gaps()
        in_gaps = sum(e - s for s, e in gaps)
        assert in_gaps + bucket.param_numel == bucket.padded_numel
    assert seen == dict(enumerate(numels))


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7, 8, 64])
@pytest.mark.parametrize("bucket_numel", [1, 50, 1000, 10**9])
def test_small_odd_shapes_cover_every_element_once(world_size, bucket_numel):
    numels = [6, 12, 6, 12, 15, 18, 6, 1, 17, 33, 100, 3]
    buckets = plan_buckets(list(enumerate(numels)), world_size=world_size, bucket_numel=bucket_numel)
    check_invariants(buckets, numels, world_size)


@pytest.mark.parametrize("world_size", [2, 3, 8])
def test_padding_is_under_a_thousandth_for_gpt2_small(world_size):
    numels = gpt2_small_numels()
    total = sum(numels)
    assert 124_000_000 < total < 125_000_000
    buckets = plan_buckets(list(enumerate(numels)), world_size=world_size, bucket_numel=25 * 2**20 // 4)
    padding = sum(b.padded_numel - b.param_numel for b in buckets)
    assert padding / total < 1e-3, (padding, total)


def test_one_bucket_per_param_when_cap_is_tiny():
    buckets = plan_buckets([(0, 10), (1, 20), (2, 30)], world_size=2, bucket_numel=1)
    assert [[s.index for s in b.slots] for b in buckets] == [[0], [1], [2]]


def test_bucket_cap_groups_params_in_the_given_order():
    buckets = plan_buckets([(5, 16), (4, 16), (3, 16), (2, 40)], world_size=1, bucket_numel=40)
    assert [[s.index for s in b.slots] for b in buckets] == [[5, 4], [3], [2]]


@pytest.mark.parametrize("bad", [dict(world_size=0, bucket_numel=1), dict(world_size=1, bucket_numel=0)])
def test_bad_arguments_are_rejected(bad):
    with pytest.raises(ValueError, match="must be >= 1"):
        plan_buckets([(0, 4)], **bad)


def test_empty_param_is_rejected():
    with pytest.raises(ValueError, match="param 3 has numel 0"):
        plan_buckets([(3, 0)], world_size=1, bucket_numel=10)


def test_segments_merge_aligned_params_and_break_after_ragged_ones():
    (bucket,) = plan_buckets([(0, 32), (1, 16), (2, 5), (3, 48)], world_size=1, bucket_numel=10**6)
    frags = bucket.fragments(0)
    segs = kernel_segments(frags, bucket.slots, [1] * len(frags))
    # params 0, 1 and the ragged 2 end one call (2's tail is a tensor tail); 3 is its own call.
    assert segs == ((0, 53, 1), (64, 112, 1))


def test_segments_break_on_different_keys_and_skipped_slots():
    (bucket,) = plan_buckets([(0, 16), (1, 16), (2, 16), (3, 16)], world_size=1, bucket_numel=10**6)
    frags = bucket.fragments(0)
    assert kernel_segments(frags, bucket.slots, [1, 1, 2, 2]) == ((0, 32, 1), (32, 64, 2))
    kept = [f for f in frags if f.slot != 1]
    assert kernel_segments(kept, bucket.slots, [1, 1, 1]) == ((0, 16, 1), (32, 64, 1))


def test_a_param_split_between_ranks_keeps_its_alignment():
    (bucket,) = plan_buckets([(0, 100), (1, 24)], world_size=2, bucket_numel=10**6)
    assert bucket.shard_numel == 80
    f0, f1 = bucket.fragments(0), bucket.fragments(1)
    assert [(f.index, f.param_start, f.param_end) for f in f0] == [(0, 0, 80)]
    assert [(f.index, f.param_start, f.param_end) for f in f1] == [(0, 80, 100), (1, 0, 24)]
    assert all(f.param_start % ALIGN_NUMEL == 0 for f in f0 + f1)

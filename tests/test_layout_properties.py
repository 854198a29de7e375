"""Property-based checks of the shard math (hypothesis): random shapes, world sizes 1..64, bucket caps."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from sharded_fused_adam.core.layout import ALIGN_NUMEL, kernel_segments, plan_buckets

numels = st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=40)


@settings(max_examples=300, deadline=None)
@given(numels=numels, world_size=st.integers(1, 64), bucket_numel=st.integers(1, 20000))
def test_every_element_is_owned_by_exactly_one_rank(numels, world_size, bucket_numel):
    buckets = plan_buckets(list(enumerate(numels)), world_size=world_size, bucket_numel=bucket_numel)
    owned = {i: [0] * n for i, n in enumerate(numels)}
    for bucket in buckets:
        assert bucket.padded_numel == bucket.shard_numel * world_size
        assert bucket.shard_numel % ALIGN_NUMEL == 0
        # padding: alignment gaps (< ALIGN per param) plus the tail (< one aligned chunk per rank)
        slack = ALIGN_NUMEL * (len(bucket.slots) + world_size)
        assert bucket.padded_numel - bucket.param_numel < slack
        for rank in range(world_size):
            for frag in bucket.fragments(rank):
                assert frag.param_start % ALIGN_NUMEL == 0  # fragments keep the vector-lane phase
                for e in range(frag.param_start, frag.param_end):
                    owned[frag.index][e] += 1
    assert all(count == 1 for counts in owned.values() for count in counts)


@settings(max_examples=200, deadline=None)
@given(numels=numels, world_size=st.integers(1, 8), data=st.data())
def test_kernel_segments_cover_exactly_the_kept_fragments(numels, world_size, data):
    (bucket,) = plan_buckets(list(enumerate(numels)), world_size=world_size, bucket_numel=10**9)
    for rank in range(world_size):
        frags = bucket.fragments(rank)
        keep = data.draw(st.lists(st.booleans(), min_size=len(frags), max_size=len(frags)))
        steps = data.draw(st.lists(st.integers(0, 2), min_size=len(frags), max_size=len(frags)))
        kept = [f for f, k in zip(frags, keep) if k]
        keys = [s for s, k in zip(steps, keep) if k]
        segments = kernel_segments(kept, bucket.slots, keys)
        covered = set()
        for start, end, key in segments:
            inside = [f for f in kept if start <= f.shard_offset < end]
            assert inside and all(keys[kept.index(f)] == key for f in inside)
            for f in inside:
                covered.add((f.index, f.param_start))
                # a ragged param's last element ends its segment (its tail stays a tensor tail)
                slot = bucket.slots[f.slot]
                if f.param_end == slot.numel and slot.numel % ALIGN_NUMEL:
                    assert f.shard_offset + f.numel == end
            dropped = [f for f, k in zip(frags, keep) if not k and start <= f.shard_offset < end]
            assert not dropped, "a segment spans a param that must not be updated"
        assert covered == {(f.index, f.param_start) for f in kept}

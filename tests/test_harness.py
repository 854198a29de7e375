"""The rank harness itself: results come back by rank, failures and hangs surface."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from conftest import RankFailed


def _all_reduce_rank(rank: int, world_size: int) -> float:
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item()


def _fail_on_rank_one(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("boom on purpose")
    dist.barrier()  # rank 0 blocks here until the harness kills it


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_results_come_back_by_rank(ranks, world_size):
    expected = world_size * (world_size + 1) / 2
    assert ranks(_all_reduce_rank, world_size) == [expected] * world_size


def test_failing_rank_traceback_is_reraised(ranks):
    with pytest.raises(RankFailed, match="rank 1 of 2 failed(.|\n)*boom on purpose"):
        ranks(_fail_on_rank_one, 2, timeout_s=30)

"""Same seed, same bits: twice in a row, and whatever order the ranks reach each collective."""
from __future__ import annotations

import random
import time

import torch

from helpers import batch, loss_fn, make_net
from sharded_fused_adam import ShardedFusedAdam


def _run(rank: int, world_size: int, jitter_seed: int | None) -> list[torch.Tensor]:
    jitter = random.Random(jitter_seed * 100 + rank) if jitter_seed is not None else None

    def pause() -> None:
        if jitter is not None:
            time.sleep(jitter.uniform(0, 0.03))  # ranks arrive at each phase in a random order

    model = make_net()
    opt = ShardedFusedAdam(model.parameters(), lr=1e-2, bucket_cap_mb=2e-4, amsgrad=True)
    for step in range(5):
        pause()
        opt.zero_grad()
        loss = loss_fn(model, *batch(step, rank, same_on_all_ranks=False))
        pause()
        loss.backward()
        pause()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_runs_are_bitwise_identical_regardless_of_arrival_order(ranks):
    reference = ranks(_run, 3, None)
    again = ranks(_run, 3, None)
    shuffled = ranks(_run, 3, 7)
    for run in (again, shuffled):
        for r in range(3):
            assert all(torch.equal(a, b) for a, b in zip(run[r], reference[r]))
    assert all(torch.equal(a, b) for a, b in zip(reference[0], reference[2]))  # ranks agree

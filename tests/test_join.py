"""Uneven inputs under ``torch.distributed.algorithms.Join``: ranks that run out of batches
shadow the others' steps (see [Note: uneven inputs] in sharded_fused_adam/grads/join.py).

Oracle: single-process ``torch.optim.Adam(fused=True)`` fed, at each step, the sum of the
gradients of the ranks that still have a batch divided by the initial world size (joined
ranks count as zeros, DDP's ``divide_by_initial_world_size=True``).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch.distributed.algorithms.join import Join

from helpers import batch, loss_fn, make_net
from sharded_fused_adam import ShardedFusedAdam

# Steps each rank has: rank 0 joins first, then rank 2, rank 1 last (2 ranks: 0 then 1).
STEPS = (2, 4, 3)
LR = 1e-2
# At 2 ranks the sum a + b (or a + 0) rounds the same in any order: bitwise. At 3 ranks the
# steps where all three are active sum a + b + c in gloo's order, not the oracle's rank
# order, not the oracle's rank order (measured: bitwise with sharded gradients, 1.2e-7 with
# replicated ones, whose all-reduce sums around a ring).
THREE_RANK_TOL = 1e-6


def _oracle_grads(ref: torch.nn.Module, step: int, world_size: int) -> list:
    """The averaged gradient of ``step``: the active ranks' sum over the initial world size
    (after the Join, at ``max(STEPS)``, every rank is active again)."""
    total: list = [None] * len(list(ref.parameters()))
    last = max(STEPS[:world_size])
    for r in range(world_size):
        if last > step >= STEPS[r]:
            continue
        ref.zero_grad(set_to_none=True)
        loss_fn(ref, *batch(step, r, same_on_all_ranks=False)).backward()
        for i, p in enumerate(ref.parameters()):
            if p.grad is not None:
                total[i] = p.grad.clone() if total[i] is None else total[i] + p.grad
    ref.zero_grad(set_to_none=True)
    return [None if t is None else t / world_size for t in total]


def _uneven(rank: int, world_size: int, grads: str) -> dict:
    model = make_net()
    ref = copy.deepcopy(model)
    opt = ShardedFusedAdam(model.parameters(), lr=LR, grads=grads)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=LR, fused=True)
    with Join([opt]):
        for step in range(STEPS[rank]):
            opt.zero_grad()
            loss_fn(model, *batch(step, rank, same_on_all_ranks=False)).backward()
            opt.step()
    last = max(STEPS[:world_size])
    # After the Join every rank is active again: one plain step, no notification left behind.
    opt.zero_grad()
    loss_fn(model, *batch(last, rank, same_on_all_ranks=False)).backward()
    opt.step()
    for step in range(last + 1):
        for p, g in zip(ref.parameters(), _oracle_grads(ref, step, world_size)):
            p.grad = g
        ref_opt.step()
    diff = max((a.detach() - b.detach()).abs().max().item() for a, b in zip(model.parameters(), ref.parameters()))
    unused_untouched = all(torch.equal(a, b) for a, b in zip(model.unused.parameters(), make_net().unused.parameters()))
    return {"diff": diff, "params": [p.detach().clone() for p in model.parameters()],
            "steps": [int(s["step"]) for s in opt.state_dict()["state"].values()], "unused": unused_untouched}


@pytest.mark.parametrize("grads", ["sharded", "replicated"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_uneven_inputs_match_the_oracle(ranks, world_size, grads):
    results = ranks(_uneven, world_size, grads)
    tol = 0.0 if world_size == 2 else THREE_RANK_TOL
    for r in results:
        assert r["diff"] <= tol, (r["diff"], tol)
        assert r["unused"], "a param no rank gave a gradient moved"
        assert set(r["steps"]) == {max(STEPS[:world_size]) + 1}, r["steps"]  # the joined ranks' steps counted
    for r in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(r["params"], results[0]["params"]))


def _throw(rank: int, world_size: int) -> str:
    model = make_net()
    opt = ShardedFusedAdam(model.parameters(), lr=LR)
    try:
        with Join([opt], throw_on_early_termination=True):
            for step in range(STEPS[rank]):
                opt.zero_grad()
                loss_fn(model, *batch(step, rank, same_on_all_ranks=False)).backward()
                opt.step()
    except RuntimeError as exc:
        return str(exc)
    return "finished"


def test_throw_on_early_termination_stops_every_rank(ranks):
    messages = ranks(_throw, 2)
    assert "Rank 0 exhausted all inputs" in messages[0], messages
    assert "Detected at least one rank that exhausted inputs" in messages[1], messages


def test_join_refuses_what_it_cannot_shadow():
    model = make_net()
    opt = ShardedFusedAdam(model.parameters(), lr=LR)
    with pytest.raises(ValueError, match="divide_by_initial_world_size=False is not supported"):
        Join([opt], divide_by_initial_world_size=False)
    already_averaged = ShardedFusedAdam(make_net().parameters(), reduce_gradients=False)
    with pytest.raises(ValueError, match="Join with a DistributedDataParallel model is not supported"):
        Join([already_averaged])
    assert opt.join_device == torch.device("cpu") and opt.join_process_group is None

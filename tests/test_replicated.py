"""Replicated gradients (grads/replicated.py): when the strategy reduces, seen through param.grad and
the bytes a step communicates (``last_step_comm_bytes``). The idioms against torch are in test_idioms.py.
"""
from __future__ import annotations

import torch

from helpers import batch, loss_fn, make_net
from sharded_fused_adam import ShardedFusedAdam


def _grad_bytes(opt: ShardedFusedAdam) -> int:
    return opt.last_step_comm_bytes.get("all_reduce", 0)


def _phases(rank: int, world_size: int) -> dict:
    model = make_net()
    opt = ShardedFusedAdam(model.parameters(), lr=1e-2, grads="replicated")
    out: dict = {}
    with opt.no_sync():  # local gradients only: the step reduces them, once
        loss_fn(model, *batch(0, rank, same_on_all_ranks=False)).backward()
    out["local"] = model.head.weight.grad.clone()
    opt.step()
    out["averaged"] = model.head.weight.grad.clone()
    out["after_no_sync"] = _grad_bytes(opt)
    opt.step()  # the averaged gradients apply again, nothing new to reduce
    out["again"] = _grad_bytes(opt)
    with opt.no_sync():
        loss_fn(model, *batch(1, rank, same_on_all_ranks=False)).backward()
    opt.zero_grad(set_to_none=False)  # the local gradients are gone: nothing to reduce
    opt.step()
    out["after_zero_grad"] = _grad_bytes(opt)
    loss_fn(model, *batch(2, rank, same_on_all_ranks=False)).backward()  # reduced in backward
    out["synced_backward_grad"] = model.head.weight.grad.clone()
    opt.step()
    out["after_synced_backward"] = _grad_bytes(opt)
    return out


def test_local_gradients_are_reduced_once_and_zeroed_ones_not_at_all(ranks):
    r0, r1 = ranks(_phases, 2)
    assert not torch.equal(r0["local"], r1["local"])
    assert torch.equal(r0["averaged"], r1["averaged"])
    torch.testing.assert_close(r0["averaged"], (r0["local"] + r1["local"]) / 2, rtol=0, atol=1e-7)
    assert torch.equal(r0["synced_backward_grad"], r1["synced_backward_grad"])
    for r in (r0, r1):
        # gradient all-reduces only (the statistics are not counted), whether in backward or at step()
        assert r["after_no_sync"] == r["after_synced_backward"] > 0
        assert r["again"] == r["after_zero_grad"] == 0

"""``optimizer.state_dict()`` called by one rank alone (see [Note: served state dicts] in served.py).

nanoGPT's loop: a DDP-wrapped model, gradient accumulation with ``no_sync``, and at step 10
``if master_process: torch.save({"model": ..., "optimizer": optimizer.state_dict()}, path)``
while the other ranks go straight on into their next backward. A second, new launch loads the
file on every rank and trains to step 20. Oracle: the same loop with
``torch.optim.AdamW(fused=True)``; DDP averages the gradients, so the arithmetic is the same
and every comparison is bitwise.
"""
from __future__ import annotations

import gc

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from helpers import batch, loss_fn, make_net
from sharded_fused_adam import CollectiveError, ShardedFusedAdamW

STEPS, SAVE_AT, ACCUM = 20, 10, 2


def _make(kind: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    if kind == "ours":
        return ShardedFusedAdamW(model.parameters(), lr=3e-3, weight_decay=0.1, state_dict_timeout=20)
    return torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, fused=True)


def _nanogpt(rank: int, world_size: int, kind: str, ckpt: str, resume: bool) -> dict:
    """nanoGPT's train.py, reduced: returns the final params (and what rank 0 saved)."""
    model = make_net()
    start = 0
    if resume:
        checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
        model.load_state_dict(checkpoint["model"])
        start = checkpoint["iter_num"]
    opt = _make(kind, model)  # nanoGPT builds the optimizer first, then wraps the model
    if resume:
        opt.load_state_dict(checkpoint["optimizer"])
    ddp = DDP(model, find_unused_parameters=True)  # OddNet has an unused layer
    for it in range(start, STEPS):
        if it == SAVE_AT and not resume and rank == 0:  # master_process alone
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "iter_num": it}, ckpt)
        for micro in range(ACCUM):
            ddp.require_backward_grad_sync = micro == ACCUM - 1
            loss = loss_fn(ddp, *batch(it * ACCUM + micro, rank, same_on_all_ranks=False)) / ACCUM
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0) if kind == "torch" else opt.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_nanogpt_rank0_checkpoint_resumes_bitwise_in_a_new_launch(ranks, tmp_path):
    ours_ckpt, ref_ckpt = str(tmp_path / "ours.pt"), str(tmp_path / "ref.pt")
    ours = ranks(_nanogpt, 2, "ours", ours_ckpt, False, timeout_s=180)[0]
    ref = ranks(_nanogpt, 2, "torch", ref_ckpt, False, timeout_s=180)[0]
    for name in ref:
        assert torch.equal(ours[name], ref[name]), name
    saved, saved_ref = torch.load(ours_ckpt, weights_only=True), torch.load(ref_ckpt, weights_only=True)
    assert sorted(saved["optimizer"]["state"]) == sorted(saved_ref["optimizer"]["state"])
    for i, entry in saved_ref["optimizer"]["state"].items():
        for key, value in entry.items():
            assert torch.equal(saved["optimizer"]["state"][i][key].to(value.dtype), value), (i, key)
    # a new launch of each resumes from its own file and ends where the uninterrupted run did
    resumed = ranks(_nanogpt, 2, "ours", ours_ckpt, True, timeout_s=180)[0]
    resumed_ref = ranks(_nanogpt, 2, "torch", ref_ckpt, True, timeout_s=180)[0]
    for name in ref:
        assert torch.equal(resumed[name], ours[name]) and torch.equal(resumed_ref[name], ref[name]), name


def _one_rank_asks(rank: int, world_size: int) -> dict:
    """Every rank alone in turn, then all at once: the same dict each time, equal to the gathered one."""
    model = make_net()
    opt = ShardedFusedAdamW(model.parameters(), lr=1e-2, state_dict_timeout=20)
    loss_fn(model, *batch(0, rank, same_on_all_ranks=False)).backward()
    opt.step()
    out = {}
    for asking in range(world_size):
        if rank == asking:
            out[f"alone{asking}"] = opt.state_dict()
        dist.barrier()  # the others wait in a collective meanwhile, as in a training loop
    out["all"] = opt.state_dict()
    out["rank0_only"] = opt.state_dict(rank0_only=True)  # {} at once elsewhere: no waiting for rank 0
    dist.barrier()  # ...but a rank must stay alive while rank 0 still reads its shards
    return out


def test_any_rank_alone_gets_the_full_state_dict(ranks):
    results = ranks(_one_rank_asks, 3, timeout_s=120)
    reference = results[0]["all"]
    for rank, res in enumerate(results):
        assert (res["rank0_only"] == {}) == (rank != 0)
        for sd in (res["all"], res[f"alone{rank}"]):
            assert sorted(sd["state"]) == sorted(reference["state"]) and sd["state"]
            for i, entry in reference["state"].items():
                for key, value in entry.items():
                    assert torch.equal(sd["state"][i][key], value), (rank, i, key)


def _peer_gone(rank: int, world_size: int) -> str:
    model = make_net()
    opt = ShardedFusedAdamW(model.parameters(), lr=1e-2, state_dict_timeout=3)
    loss_fn(model, *batch(0, rank, same_on_all_ranks=False)).backward()
    opt.step()
    dist.barrier()
    if rank == 1:
        del opt  # its server stops with it: a rank that will never answer
        gc.collect()
        dist.barrier()
        return ""
    dist.barrier()
    try:
        opt.state_dict()
    except CollectiveError as exc:
        return str(exc)
    return "no error"


def test_a_rank_that_never_answers_is_named_within_the_timeout(ranks):
    message = ranks(_peer_gone, 2, timeout_s=60)[0]
    assert "rank(s) [1] did not answer within 3 s" in message, message

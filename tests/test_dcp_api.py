"""torch's distributed-checkpoint API on ``ShardedFusedAdamW``, written as torchtitan users write it.

``get_optimizer_state_dict(model, opt)`` + ``dcp.save`` on 2 gloo ranks after 3 steps, then a
new launch (2 ranks, and 1) that ``dcp.load``s into ``get_optimizer_state_dict`` of a fresh
optimizer and ``set_optimizer_state_dict``s it, and trains on to step 5. Every rank feeds the
same batches, so the averaged gradient is exact at 1 and 2 ranks and everything is bitwise:
against the uninterrupted run and against single-process ``torch.optim.AdamW(fused=True)``.
The model is one whose every param gets a gradient: on a fresh optimizer the API itself
creates state for every param (see [Note: optimizer.state is truthy once stepped]), as it does
for torch's, so a param without saved state would be a missing key for torch's too.
"""
from __future__ import annotations

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from sharded_fused_adam import ShardedFusedAdamW

SAVE_AT, STEPS = 3, 5


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(37, 13), nn.Flatten(), nn.Linear(13 * 6, 29), nn.LayerNorm(29), nn.GELU(),
                         nn.Linear(29, 5))


def _step(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    tokens, target = torch.randint(0, 37, (8, 6), generator=g), torch.randn(8, 5, generator=g)
    nn.functional.mse_loss(model(tokens), target).backward()
    opt.step()
    opt.zero_grad()


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _train_and_save(rank: int, world_size: int, folder: str) -> dict:
    model = _model()
    opt = ShardedFusedAdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for step in range(SAVE_AT):
        _step(model, opt, step)
    before = opt.state_dict()
    osd = get_optimizer_state_dict(model, opt)
    dcp.save({"model": model.state_dict(), "optim": osd}, checkpoint_id=folder)
    after = opt.state_dict()  # the API read the state without stepping (no zero-gradient step)
    untouched = all(torch.equal(before["state"][i][k], v) for i, e in after["state"].items() for k, v in e.items())
    for step in range(SAVE_AT, STEPS):
        _step(model, opt, step)
    return {"params": _params(model), "untouched": untouched, "keys": sorted(osd["state"])}


def _load_and_train(rank: int, world_size: int, folder: str) -> dict:
    model = _model()
    opt = ShardedFusedAdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    state = {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(state, checkpoint_id=folder)
    model.load_state_dict(state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    for step in range(SAVE_AT, STEPS):
        _step(model, opt, step)
    return _params(model)


def test_dcp_save_and_load_of_the_optimizer_at_the_same_and_another_world_size(ranks, tmp_path):
    folder = str(tmp_path / "dcp")
    saved = ranks(_train_and_save, 2, folder, timeout_s=180)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run: the backward's sums then add in the same order
    try:
        model = _model()
        ref_opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
        for step in range(STEPS):
            _step(model, ref_opt, step)
    finally:
        torch.set_num_threads(threads)
    expected = _params(model)
    for res in saved:
        assert res["untouched"] and res["keys"], res["keys"]
        assert all(torch.equal(res["params"][n], v) for n, v in expected.items())
    for world_size in (2, 1):
        for params in ranks(_load_and_train, world_size, folder, timeout_s=180):
            for name, value in expected.items():
                assert torch.equal(params[name], value), (world_size, name)

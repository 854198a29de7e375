"""Soak: a long run checkpointed and resumed every N steps at changing world sizes, from
alternating formats, ends bitwise equal to an uninterrupted run.

The short form runs in CI (``SFA_SOAK_STEPS``, default 240 steps resuming every 40); the full
soak is ``pytest -m slow tests/test_soak.py`` (2,000 steps resuming every 100).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from helpers import make_net, param_groups
from sharded_fused_adam import ShardedFusedAdam, load_full, load_sharded, save_full, save_sharded
from test_checkpoint import OPT, _train, reference_run

WORLD_SIZES = [2, 3, 1, 4, 3]


def _segment(rank: int, world_size: int, folder: str, start: int, stop: int, load_from: str) -> list:
    folder = Path(folder)
    model = make_net()
    if load_from:
        model.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
    opt = ShardedFusedAdam(param_groups(model, "two"), **OPT)
    if load_from == "full":
        load_full(opt, folder / "full.pt")
    elif load_from == "sharded":
        load_sharded(opt, folder / "sharded")
    _train(model, opt, range(start, stop))
    save_full(opt, folder / "full.pt")
    save_sharded(opt, folder / "sharded", keep_last=2)
    if rank == 0:
        torch.save(model.state_dict(), folder / "model.pt")
    return [p.detach().clone() for p in model.parameters()]


def _soak(ranks, tmp_path, total: int, every: int) -> None:
    schedule: list[int] = []
    for segment, start in enumerate(range(0, total, every)):
        world_size = WORLD_SIZES[segment % len(WORLD_SIZES)]
        load_from = "" if segment == 0 else ("sharded" if segment % 2 else "full")
        results = ranks(_segment, world_size, str(tmp_path), start, start + every, load_from, timeout_s=300)
        schedule += [world_size] * every
    expected = reference_run(schedule)
    for params in results:
        assert all(torch.equal(a, b) for a, b in zip(params, expected))


def test_soak_short(ranks, tmp_path):
    _soak(ranks, tmp_path, int(os.environ.get("SFA_SOAK_STEPS", 240)), 40)


@pytest.mark.slow
def test_soak_full(ranks, tmp_path):
    _soak(ranks, tmp_path, 2000, 100)

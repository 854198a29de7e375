"""Dead, stuck and crashing ranks: the survivors fail in bounded time, naming the rank and the collective."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from helpers import batch, loss_fn, make_net
from sharded_fused_adam import CollectiveError, ShardedFusedAdam, load_sharded, save_sharded
from sharded_fused_adam.testing import wrap_gather_plan


def _train_until(rank: int, world_size: int, fault: str) -> dict:
    """The last rank gets stuck or raises at step 2; a killed rank is tested further down."""
    model = make_net()
    opt = ShardedFusedAdam(model.parameters(), lr=1e-2, collective_timeout=4.0)
    victim = world_size - 1
    started = time.monotonic()
    try:
        for step in range(4):
            opt.zero_grad()
            loss_fn(model, *batch(step, rank, same_on_all_ranks=False)).backward()
            if step == 2 and rank == victim:
                if fault == "stuck":
                    time.sleep(12)  # alive but elsewhere: only the timeout can end the wait
                    return {"victim": True}
                if fault == "raised":
                    try:
                        raise ValueError("a bug in this rank's data pipeline")
                    except ValueError:
                        return {"victim": True}  # leaving the function destroys the process group
            started = time.monotonic()
            opt.step()
    except CollectiveError as exc:
        return {"victim": False, "error": str(exc), "seconds": time.monotonic() - started}
    return {"victim": rank == victim, "error": None}


@pytest.mark.parametrize("fault", ["stuck", "raised"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_survivors_name_the_missing_rank_and_the_collective(ranks, world_size, fault):
    results = ranks(_train_until, world_size, fault, timeout_s=60)
    victim = world_size - 1
    assert results[victim]["victim"]
    for r in results[:victim]:
        assert r["error"] is not None
        assert f"rank(s) [{victim}] never reached it" in r["error"], r["error"]
        assert "of gradients of bucket" in r["error"] or "step statistics" in r["error"], r["error"]
        assert r["seconds"] < 4.0 + 5.0 + 5.0, r  # timeout + the store probe + slack


def _killed_survivor(rank: int, world_size: int, folder: str) -> dict:
    """Like _train_until(killed), but the survivor reports back instead of the harness failing."""
    model = make_net()
    opt = ShardedFusedAdam(model.parameters(), lr=1e-2, collective_timeout=4.0)
    opt.zero_grad()
    loss_fn(model, *batch(0, rank, same_on_all_ranks=True)).backward()
    opt.step()
    save_sharded(opt, Path(folder) / "ck")
    if rank == 1:
        import sharded_fused_adam.checkpoint.sharded as sc

        def die(*args):
            os._exit(9)
        sc._write_rank_files = die
    started = time.monotonic()
    try:
        save_sharded(opt, Path(folder) / "ck")
    except CollectiveError as exc:
        (Path(folder) / "survivor.txt").write_text(f"{time.monotonic() - started:.1f}\n{exc}")
    return {}


def _reload(rank: int, world_size: int, folder: str) -> int:
    model = make_net()
    opt = ShardedFusedAdam(model.parameters(), lr=1e-2)
    load_sharded(opt, Path(folder) / "ck")
    return max(max(b.steps) for b in opt.shard_state().buckets)


def _survivor_report(ranks, fn, folder: Path) -> tuple[float, str]:
    """Run ``fn`` where rank 1 dies; return how long rank 0 waited and the error it raised."""
    from conftest import RankFailed

    with pytest.raises(RankFailed):
        ranks(fn, 2, str(folder), timeout_s=60)
    seconds, message = (folder / "survivor.txt").read_text().split("\n", 1)
    return float(seconds), message


def test_a_rank_killed_while_saving_is_named_and_the_previous_checkpoint_loads(ranks, tmp_path):
    seconds, message = _survivor_report(ranks, _killed_survivor, tmp_path)
    assert "rank(s) [1] never reached it" in message and "barrier after writing the shard files" in message
    assert seconds < 15
    assert (tmp_path / "ck" / "LATEST").read_text() == "v00000001"
    assert ranks(_reload, 3, str(tmp_path)) == [1, 1, 1]


class _DiesAtGather:
    """A plan whose process exits when asked to gather (the others see a rank die mid-step)."""

    def __init__(self, plan):
        self._plan = plan

    def gather(self, flat, what="params"):
        os._exit(9)

    def __getattr__(self, name):
        return getattr(self._plan, name)


def _killed_in_step(rank: int, world_size: int, folder: str) -> dict:
    model = make_net()
    opt = ShardedFusedAdam(model.parameters(), lr=1e-2, collective_timeout=4.0)
    opt.zero_grad()
    loss_fn(model, *batch(0, rank, same_on_all_ranks=True)).backward()
    if rank == 1:
        wrap_gather_plan(opt, _DiesAtGather)  # dies after its first update, before gathering
    started = time.monotonic()
    try:
        opt.step()
        opt.wait_for_gathers()  # the overlapped gather fails at the first read, or here
    except CollectiveError as exc:
        (Path(folder) / "survivor.txt").write_text(f"{time.monotonic() - started:.1f}\n{exc}")
    return {}


def test_a_rank_killed_inside_step_is_named_by_the_survivor(ranks, tmp_path):
    seconds, message = _survivor_report(ranks, _killed_in_step, tmp_path)
    assert "rank(s) [1] never reached it" in message and "all-gather of params of bucket" in message
    assert seconds < 15


def test_collective_timeout_is_validated():
    with pytest.raises(ValueError, match="collective_timeout must be > 0 seconds or None, got 0"):
        ShardedFusedAdam([torch.nn.Parameter(torch.ones(2))], collective_timeout=0)

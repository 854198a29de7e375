"""A save killed at each of its steps (os._exit at the ``crash_point`` test seam): the newest fully written
version loads, and the next save succeeds and leaves no debris.

Rank 0 of a 1-rank job does every step of a save (rank files, commit, pointer, prune), so
one rank covers them all; a second rank dying mid-write is tested in test_checkpoint.py.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from conftest import RankFailed
from helpers import batch, loss_fn, make_net, param_groups
from sharded_fused_adam import ShardedFusedAdam, load_full, load_sharded, save_full, save_sharded
from sharded_fused_adam.checkpoint.files import CRASH_EXIT_CODE, SAVE_FULL_STEPS, SAVE_STEPS

OPT = dict(lr=1e-2, amsgrad=True)


def _train(model, opt, steps):
    for step in steps:
        opt.zero_grad()
        loss_fn(model, *batch(step, 0, same_on_all_ranks=True)).backward()
        opt.step()


def _save_twice_and_die(rank: int, world_size: int, folder: str, fmt: str, step: str) -> None:
    folder = Path(folder)
    model = make_net()
    opt = ShardedFusedAdam(param_groups(model, "two"), **OPT)
    save = save_sharded if fmt == "sharded" else save_full
    target = folder / ("ck" if fmt == "sharded" else "full.pt")
    _train(model, opt, range(2))
    save(opt, target)
    torch.save(opt.state_dict(), folder / "first.pt")
    _train(model, opt, range(2, 3))
    torch.save(opt.state_dict(), folder / "second.pt")
    os.environ["SFA_CHECKPOINT_CRASH_AT"] = step
    save(opt, target)  # dies at `step`: returning means the step was never reached


def _same(opt, file: Path) -> bool:
    expected, now = torch.load(file, weights_only=True), opt.state_dict()
    return expected["state"].keys() == now["state"].keys() and all(
        torch.equal(now["state"][i][k], v) for i, e in expected["state"].items() for k, v in e.items())


def _crash_then_recover(ranks, tmp_path, fmt: str, step: str, committed: bool) -> None:
    with pytest.raises(RankFailed, match=rf"exit codes \[{CRASH_EXIT_CODE}\]"):
        ranks(_save_twice_and_die, 1, str(tmp_path), fmt, step, timeout_s=60)
    load, save = (load_sharded, save_sharded) if fmt == "sharded" else (load_full, save_full)
    target = tmp_path / ("ck" if fmt == "sharded" else "full.pt")
    model = make_net()
    opt = ShardedFusedAdam(param_groups(model, "two"), **OPT)
    load(opt, target)
    assert _same(opt, tmp_path / ("second.pt" if committed else "first.pt")), f"wrong version after a kill at {step}"
    _train(model, opt, range(3, 4))
    save(opt, target)  # the dead job's lock is stale (its pid is gone): taken over
    again = ShardedFusedAdam(param_groups(make_net(), "two"), **OPT)
    load(again, target)
    torch.save(opt.state_dict(), tmp_path / "third.pt")
    assert _same(again, tmp_path / "third.pt")


@pytest.mark.parametrize("step", SAVE_STEPS)
def test_sharded_save_killed_at_each_step(ranks, tmp_path, step):
    committed = SAVE_STEPS.index(step) >= SAVE_STEPS.index("committed")
    _crash_then_recover(ranks, tmp_path, "sharded", step, committed)
    next_free = 2 if step in ("locked", "recovered") else 3  # from "tmp_created" on, v00000002 is debris or taken
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["LATEST", "LOCK", f"v0000000{next_free}"]
    assert (tmp_path / "ck" / "LATEST").read_text() == f"v0000000{next_free}"


@pytest.mark.parametrize("step", SAVE_FULL_STEPS)
def test_gathered_save_killed_at_each_step(ranks, tmp_path, step):
    _crash_then_recover(ranks, tmp_path, "full", step, committed=step == "replaced")
    assert sorted(p.name for p in tmp_path.iterdir() if "full" in p.name) == ["full.pt"]  # no .full.pt.tmp* left


def test_versions_never_collide_with_debris(tmp_path):
    model = make_net()
    opt = ShardedFusedAdam(param_groups(model, "two"), **OPT)
    _train(model, opt, range(1))
    ck = tmp_path / "ck"
    save_sharded(opt, ck)
    save_sharded(opt, ck, keep_last=2)
    (ck / "v00000007.tmp").mkdir()  # a killed save's folder, numbered above everything committed
    (ck / "v00000007.tmp" / "rank00000.bin").write_bytes(b"half")
    (ck / "v00000005.del").mkdir()  # an interrupted prune
    (ck / "LATEST").write_text("v00000001")  # stale: v00000002 was committed after it
    (ck / "LATEST.tmp").write_text("v0000")
    reloaded = ShardedFusedAdam(param_groups(make_net(), "two"), **OPT)
    load_sharded(reloaded, ck)  # the newest committed version, whatever LATEST says
    assert reloaded.state_dict()["state"][0]["step"] == 1
    assert save_sharded(opt, ck, keep_last=2).name == "v00000008"
    assert sorted(p.name for p in ck.iterdir()) == ["LATEST", "LOCK", "v00000002", "v00000008"]
    assert (ck / "LATEST").read_text() == "v00000008"

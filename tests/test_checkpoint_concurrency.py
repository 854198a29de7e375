"""Saves from two threads of one process (an async checkpoint thread beside the training loop): the second
save into the same place while the first runs is refused at once, naming the thread; nothing else breaks."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from sharded_fused_adam import (CheckpointError, CheckpointLockedError, ShardedFusedAdam, load_full, load_sharded,
                                save_full, save_sharded)
from sharded_fused_adam.checkpoint.files import committed_versions
from sharded_fused_adam.checkpoint.lock import one_save_at_a_time


def _trained(steps: int = 1) -> ShardedFusedAdam:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    opt = ShardedFusedAdam(model.parameters(), lr=1e-2)
    for step in range(steps):
        model(torch.randn(4, 64, generator=torch.Generator().manual_seed(step))).square().mean().backward()
        opt.step()
    return opt


def _race(save, opt, target: Path, rounds: int) -> tuple[list, list]:
    """Two threads each calling ``save(opt, target)`` ``rounds`` times at once: (results, errors)."""
    results, errors, start = [], [], threading.Barrier(2)

    def worker() -> None:
        start.wait()
        for _ in range(rounds):
            try:
                results.append(save(opt, target))
            except Exception as exc:  # every kind is collected: the test checks which ones happened
                errors.append(exc)

    threads = [threading.Thread(target=worker, name=f"saver-{i}") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results, errors


def test_a_second_save_sharded_while_one_runs_is_refused_naming_the_thread(tmp_path):
    opt = _trained()
    ck = tmp_path / "ck"
    with one_save_at_a_time(ck, "a save in the test's thread"):  # what a running save holds
        errors = []
        other = threading.Thread(target=lambda: _catch(errors, save_sharded, opt, ck), name="async-checkpoint")
        other.start()
        other.join(timeout=60)
    assert len(errors) == 1 and isinstance(errors[0], CheckpointLockedError)
    message = str(errors[0])
    assert f"thread {threading.current_thread().name!r} of this same process" in message
    assert "another job" not in message and not ck.exists()  # refused before touching anything
    assert save_sharded(opt, ck).name == "v00000001"  # released: the next save runs


def _catch(errors: list, fn, *args) -> None:
    try:
        fn(*args)
    except Exception as exc:
        errors.append(exc)


def test_racing_save_sharded_threads_commit_only_loadable_versions(tmp_path):
    opt = _trained()
    ck = tmp_path / "ck"
    results, errors = _race(lambda o, p: save_sharded(o, p, keep_last=100), opt, ck, rounds=8)
    assert all(isinstance(e, CheckpointLockedError) and "of this same process" in str(e) for e in errors), errors
    assert len(results) + len(errors) == 16 and results
    assert sorted(int(p.name[1:]) for p in results) == committed_versions(ck)  # each success is one version
    assert sorted(p.name for p in ck.iterdir() if not p.name.startswith("v")) == ["LATEST", "LOCK"]
    load_sharded(_trained(0), ck)


def test_racing_save_full_threads_leave_one_good_file(tmp_path):
    opt = _trained()
    target = tmp_path / "full.pt"
    results, errors = _race(save_full, opt, target, rounds=8)
    assert all(isinstance(e, CheckpointLockedError) and "of this same process" in str(e) for e in errors), errors
    assert len(results) + len(errors) == 16 and results
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full.pt"]  # no .full.pt.tmp* left
    load_full(_trained(0), target)


def test_the_refusal_is_a_checkpoint_error():
    assert issubclass(CheckpointLockedError, CheckpointError)
    with pytest.raises(CheckpointLockedError, match="refused"):
        with one_save_at_a_time(Path("somewhere"), "first"):
            with one_save_at_a_time(Path("somewhere"), "second"):
                pass

"""One writer per checkpoint directory: a second live job is refused at once and touches nothing; stale locks
(dead pid on this host, the same job restarted, not refreshed for too long) are taken over."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import RankFailed
from helpers import batch, loss_fn, make_net
from sharded_fused_adam import ShardedFusedAdam, save_sharded
from sharded_fused_adam.checkpoint.lock import CheckpointLockedError, acquire

REPO = Path(__file__).resolve().parents[1]

# Job A: one rank, saves, says so, waits for "go", saves again (still the owner), exits.
JOB_A = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from helpers import batch, loss_fn, make_net
from sharded_fused_adam import ShardedFusedAdam, save_sharded
folder = Path(sys.argv[1])
model = make_net()
opt = ShardedFusedAdam(model.parameters(), lr=1e-2)
loss_fn(model, *batch(0, 0, same_on_all_ranks=True)).backward()
opt.step()
save_sharded(opt, folder / "ck")
(folder / "a_saved").write_text("1")
deadline = time.monotonic() + 60
while not (folder / "go").exists() and time.monotonic() < deadline:
    time.sleep(0.05)
print(save_sharded(opt, folder / "ck").name)
"""


def _job_b(rank: int, world_size: int, folder: str) -> None:
    model = make_net()
    opt = ShardedFusedAdam(model.parameters(), lr=1e-2)
    loss_fn(model, *batch(0, rank, same_on_all_ranks=True)).backward()
    opt.step()
    save_sharded(opt, Path(folder) / "ck")


def _digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "LOCK"}


def test_a_second_job_is_refused_at_once_and_touches_nothing(ranks, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    job_a = subprocess.Popen([sys.executable, "-c", JOB_A, str(tmp_path), str(REPO / "tests")], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not (tmp_path / "a_saved").exists():
            assert job_a.poll() is None and time.monotonic() < deadline, job_a.communicate()
            time.sleep(0.1)
        before = _digest(tmp_path / "ck")
        started = time.monotonic()
        with pytest.raises(RankFailed, match="is locked by another job"):
            ranks(_job_b, 2, str(tmp_path), timeout_s=60)
        assert time.monotonic() - started < 30  # no collective timeout was waited for
        with pytest.raises(CheckpointLockedError, match=f"host {socket.gethostname()} pid {job_a.pid} "):
            acquire(tmp_path / "ck")  # what rank 0 of job B said: the owner
        assert _digest(tmp_path / "ck") == before
        (tmp_path / "go").write_text("1")
        out, err = job_a.communicate(timeout=60)
        assert job_a.returncode == 0 and out.strip() == "v00000002", err
    finally:
        if job_a.poll() is None:
            job_a.kill()
            job_a.wait()
    assert not (tmp_path / "ck" / "LOCK").exists()  # released when job A exited
    ranks(_job_b, 2, str(tmp_path))
    assert (tmp_path / "ck" / "LATEST").read_text() == "v00000003"


def _write_lock(folder: Path, age_s: float = 0.0, **holder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / "LOCK"
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "job_id": "", "time": time.time(), "token": "x",
                                **holder}))
    os.utime(lock, (time.time() - age_s, time.time() - age_s))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


STALE_CASES = [
    ("live job on another host", lambda: dict(host="elsewhere", pid=1), 0.0, False),
    ("another host, not refreshed", lambda: dict(host="elsewhere", pid=1), 400.0, True),
    ("dead pid on this host", lambda: dict(host=socket.gethostname(), pid=_dead_pid()), 0.0, True),
    ("live pid on this host", lambda: dict(host=socket.gethostname(), pid=os.getppid()), 0.0, False),
    ("same job restarted", lambda: dict(host="elsewhere", pid=1, job_id="job-42"), 0.0, True),
    ("garbage lock file", None, 0.0, False),
]


@pytest.mark.parametrize("case,holder,age_s,taken", STALE_CASES, ids=[c[0] for c in STALE_CASES])
def test_stale_locks_are_taken_over_live_ones_refused(tmp_path, monkeypatch, case, holder, age_s, taken):
    monkeypatch.setenv("SFA_JOB_ID", "job-42")
    folder = tmp_path / "ck"
    if holder is None:
        folder.mkdir()
        (folder / "LOCK").write_text("{half a")
    else:
        _write_lock(folder, age_s, **holder())
    if taken:
        lock = acquire(folder)
        assert json.loads((folder / "LOCK").read_text())["pid"] == os.getpid()
        lock.release()
    else:
        with pytest.raises(CheckpointLockedError, match=f"{folder} is locked by another job"):
            acquire(folder)


def test_a_job_that_lost_its_lock_refuses_to_save(tmp_path):
    model = make_net()
    opt = ShardedFusedAdam(model.parameters(), lr=1e-2)
    save_sharded(opt, tmp_path / "ck")
    _write_lock(tmp_path / "ck", host="elsewhere", pid=1)  # someone deleted ours and another job took it
    with pytest.raises(CheckpointLockedError, match="this job lost its lock .* held by host elsewhere pid 1"):
        save_sharded(opt, tmp_path / "ck")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["LATEST", "LOCK", "v00000001"]


def test_a_live_process_of_the_same_job_is_refused_not_taken_over(tmp_path, monkeypatch):
    """Same job id, pid alive on this host: a second writer of one job, not a restart (and it is told so)."""
    monkeypatch.setenv("SFA_JOB_ID", "job-42")
    _write_lock(tmp_path / "ck", host=socket.gethostname(), pid=os.getppid(), job_id="job-42")
    with pytest.raises(CheckpointLockedError, match=f"locked by another process of this same job .*pid "
                                                    f"{os.getppid()} job job-42.*still running"):
        acquire(tmp_path / "ck")


@pytest.mark.slow
def test_two_processes_of_one_job_saving_into_one_directory(tmp_path, monkeypatch):
    """The second process gets a clear CheckpointLockedError and changes nothing; the first keeps saving."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", SFA_JOB_ID="job-7")
    job_a = subprocess.Popen([sys.executable, "-c", JOB_A, str(tmp_path), str(REPO / "tests")], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not (tmp_path / "a_saved").exists():
            assert job_a.poll() is None and time.monotonic() < deadline, job_a.communicate()
            time.sleep(0.1)
        before = _digest(tmp_path / "ck")
        monkeypatch.setenv("SFA_JOB_ID", "job-7")
        model = make_net()
        opt = ShardedFusedAdam(model.parameters(), lr=1e-2)
        loss_fn(model, *batch(0, 0, same_on_all_ranks=True)).backward()
        opt.step()
        with pytest.raises(CheckpointLockedError, match=f"another process of this same job .*pid {job_a.pid} "):
            save_sharded(opt, tmp_path / "ck")
        assert _digest(tmp_path / "ck") == before
        (tmp_path / "go").write_text("1")
        out, err = job_a.communicate(timeout=60)
        assert job_a.returncode == 0 and out.strip() == "v00000002", err
    finally:
        if job_a.poll() is None:
            job_a.kill()
            job_a.wait()

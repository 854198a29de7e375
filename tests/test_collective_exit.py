"""Survivors of a dead (SIGKILL) or stopped (SIGSTOP) rank leave within collective_timeout + 10 s, under plain
processes, torchrun and mpirun (see [Note: abandoning a failed group]).

The process group keeps gloo's default 30-minute timeout, so a survivor that waited for
gloo's blocked threads would be caught by the bound. The two faults run at once per
launcher (most of the time is waiting); each survivor's exit is seen by polling its pid,
and each victim is killed by pid at the end. torchrun is marked slow (CI time): its
workers leave by the same path as the plain launcher's; mpirun has its own (see [Note:
MPI finalize after a failure] in launcher/mpi.py).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_launcher_e2e import BIN, REPO, clean_env, free_port, mpirun_prefix

WORKER = REPO / "tests" / "collective_exit_worker.py"
COLLECTIVE_TIMEOUT_S = 2.0
BOUND_S = COLLECTIVE_TIMEOUT_S + 10.0


def _commands(launcher: str, out: Path, fault: str) -> list[tuple[list[str], dict]]:
    args = [str(WORKER), "--out", str(out), "--fault", fault, "--timeout", str(COLLECTIVE_TIMEOUT_S)]
    if launcher == "plain":
        port = str(free_port())
        return [([sys.executable, *args], clean_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                                                    MASTER_ADDR="127.0.0.1", MASTER_PORT=port)) for r in range(2)]
    if launcher == "torchrun":
        torchrun = shutil.which("torchrun", path=str(BIN)) or shutil.which("torchrun")
        return [([torchrun, "--nproc-per-node", "2", "--master-port", str(free_port()), *args], clean_env())]
    return [([*mpirun_prefix(2), sys.executable, *args], clean_env())]


def _logs(out: Path):
    for i in range(2):
        yield open(out / f"log{i}.txt", "w")


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _watch(out: Path, procs: list[subprocess.Popen], deadline: float) -> float:
    """Seconds from the victim's signal to the survivor's exit."""
    while not ((out / "victim").exists() and (out / "pid0").exists()):
        assert time.monotonic() < deadline and any(p.poll() is None for p in procs), \
            f"{out}: the job never started: {(out / 'log0.txt').read_text()[-3000:]}"
        time.sleep(0.1)
    survivor = int((out / "pid0").read_text())
    while not _gone(survivor):
        assert time.monotonic() < deadline, f"{out}: the survivor (pid {survivor}) is still alive"
        time.sleep(0.1)
    gone_at = time.time()
    return gone_at - float((out / "victim").read_text())


@pytest.mark.parametrize("launcher", ["plain", "mpirun", pytest.param("torchrun", marks=pytest.mark.slow)])
def test_survivors_exit_in_bounded_time(tmp_path, launcher):
    if launcher == "mpirun":
        mpirun_prefix(2)  # skips, naming what is missing, if there is no mpirun
    jobs = []
    for fault in ("kill", "stop"):  # both at once: most of the time is waiting
        out = tmp_path / fault
        out.mkdir()
        procs = [subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
                 for (cmd, env), log in zip(_commands(launcher, out, fault), _logs(out))]
        jobs.append((fault, out, procs))
    try:
        deadline = time.monotonic() + 120
        for fault, out, procs in jobs:
            seconds = _watch(out, procs, deadline)
            assert seconds < BOUND_S, f"{launcher}/{fault}: the survivor left {seconds:.1f} s after the fault"
            if launcher != "plain" and fault == "kill":
                continue  # torchrun and mpirun may end the survivor themselves once they see the victim die
            error = json.loads((out / "error0.json").read_text())["message"]  # it failed loudly, naming rank 1
            assert "rank(s) [1] never reached it" in error, (launcher, fault, error)
    finally:
        for _, out, procs in jobs:
            victim = out / "pid1"
            if victim.exists() and not _gone(int(victim.read_text())):
                try:
                    os.kill(int(victim.read_text()), signal.SIGKILL)  # a stopped victim (our own child's child)
                except ProcessLookupError:
                    pass  # its launcher ended it meanwhile
            for proc in procs:
                try:
                    proc.wait(timeout=40)  # torchrun and mpirun notice the dead victim and exit
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

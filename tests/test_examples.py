"""The examples, run for a few steps as real processes under the launcher, torchrun and mpirun.

Each run has a hard timeout and starts from an environment without launcher variables (the
tests may themselves run under SLURM or mpirun). Results are read from what the scripts
wrote or printed after their own checks, not only from exit codes. About 45 s in all here.
"""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from test_launcher_e2e import mpirun_prefix

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
BIN = Path(sys.executable).parent

_LAUNCHER_PREFIXES = ("OMPI_", "PMI_", "PMIX_", "SLURM_", "MPI_LOCAL", "SFA_", "TORCHELASTIC_", "MASTER_",
                      "LOCAL_", "CROSS_", "MPI4PY_")
_LAUNCHER_NAMES = {"RANK", "WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE"}


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in _LAUNCHER_NAMES and not k.startswith(_LAUNCHER_PREFIXES)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    return env


def free_port() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def run(cmd: list[str], timeout: float) -> str:
    """Run ``cmd`` from the repository root; return its output after checking it succeeded."""
    proc = subprocess.run(cmd, env=clean_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} exited with {proc.returncode}:\n{output[-6000:]}"
    return output


def test_train_gpt_under_launcher(tmp_path):
    run([sys.executable, "-m", "launcher", "--nproc-per-node", "2", "--master-port", free_port(),
         str(EXAMPLES / "train_gpt.py"), "--steps", "20", "--out-dir", str(tmp_path)], timeout=300)
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 20 and len(summary["losses"]) == 20
    assert summary["parity"]["passed"], summary["parity"]
    assert summary["parity"]["max_abs_diff"] <= summary["parity"]["tolerance"] <= 1e-5
    assert summary["final_loss"] < summary["first_loss"] - 0.3, (summary["first_loss"], summary["final_loss"])
    unsharded = summary["memory"]["unsharded_adam_ddp_per_rank"]["optimizer_state"]
    for report in summary["memory"]["sharded_per_rank"]:  # Adam's moments are split over the 2 ranks
        assert unsharded // 2 <= report["optimizer_state"] < unsharded * 0.51


def test_corpus_is_the_generator_output():
    spec = importlib.util.spec_from_file_location("make_corpus", EXAMPLES / "data" / "make_corpus.py")
    make_corpus = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_corpus)
    committed = (EXAMPLES / "data" / "corpus.txt").read_text(encoding="ascii")
    assert make_corpus.generate(seed=1234, num_bytes=400 * 1024) == committed
    assert committed.startswith(make_corpus.HEADER) and "CC0" in make_corpus.HEADER


def test_train_custom_loop_under_torchrun():
    torchrun = BIN / "torchrun"
    if not torchrun.exists():
        pytest.skip(f"{torchrun} not found")
    output = run([str(torchrun), "--nproc-per-node", "2", "--master-port", free_port(),
                  str(EXAMPLES / "train_custom_loop.py"), "--steps", "5"], timeout=120)
    assert "step   4" in output and "done on 2 ranks" in output, output


def test_train_mpi_under_mpirun():
    output = run([*mpirun_prefix(2), sys.executable, str(EXAMPLES / "mpirun" / "train_mpi.py"), "--steps", "5"],
                 timeout=120)
    for rank in range(2):
        assert f"rank {rank} of 2: started by mpi, backend gloo, device cpu" in output, output
    assert "step 4" in output and "parameters identical on all 2 ranks: True" in output, output


def test_npu_quickstart_on_cpu():
    output = run([sys.executable, str(EXAMPLES / "npu_quickstart.py")], timeout=120)
    assert "device cpu, 1 rank(s)" in output, output
    assert output.count("max |p - torch.optim.Adam|") == 7
    assert "the param without a gradient is unchanged" in output
    assert "step  5: overflow on rank 0 -> step skipped on all 1 rank(s), params unchanged, scale 65536 -> 32768" \
        in output, output
    assert "step 15: loss" in output

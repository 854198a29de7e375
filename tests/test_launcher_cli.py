"""launcher.cli in process: argument checks, torchrun argument building, and the one-rank-per-task mode."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from launcher import cli

SCRIPT = """\
import json, sys
with open(sys.argv[1], "w") as handle:
    json.dump({"argv": sys.argv, "name": __name__, "path0": sys.path[0]}, handle)
sys.exit(int(sys.argv[2]))
"""

OPEN_MPI_RANK1 = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
                  "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No launcher variables; sys.argv, sys.path and the whole environment restored afterwards
    (``cli.main`` runs in this process and sets MASTER_ADDR, RANK, ... for the script: none of
    that may leak into later tests, which would then try to reach that master)."""
    saved = dict(os.environ)
    for name in list(os.environ):
        if name in ("RANK", "WORLD_SIZE") or name.startswith(("OMPI_", "PMI_", "SLURM_", "SFA_", "MASTER_")):
            monkeypatch.delenv(name)
    for name in ("SFA_BACKEND", "SFA_DEVICE", "SFA_RENDEZVOUS_TIMEOUT", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    yield script
    os.environ.clear()
    os.environ.update(saved)


def test_under_mpi_the_script_runs_in_this_process(isolated, monkeypatch, tmp_path):
    for name, value in OPEN_MPI_RANK1.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "out.json"
    code = cli.main(["--backend", "gloo", "--master-addr", "10.0.0.1", "--master-port", "1234",
                     str(isolated), str(out), "3", "--flag"])
    assert code == 3
    seen = json.loads(out.read_text())
    assert seen == {"argv": [str(isolated), str(out), "3", "--flag"], "name": "__main__",
                    "path0": str(isolated.parent)}
    assert os.environ["SFA_BACKEND"] == "gloo"
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("10.0.0.1", "1234")


def test_under_mpi_node_options_need_nproc_per_node(isolated, monkeypatch, capsys):
    for name, value in OPEN_MPI_RANK1.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as info:
        cli.main(["--nnodes", "2", str(isolated)])
    assert info.value.code == 2
    assert "already rank 1 of 2 (started by mpi)" in capsys.readouterr().err


@pytest.mark.parametrize("argv, fragment", [
    (["missing_script.py"], "script 'missing_script.py' does not exist"),
    (["--nproc-per-node", "0", "SCRIPT"], "--nproc-per-node must be a positive integer or 'auto', got '0'"),
    (["--nnodes", "2", "SCRIPT"], "--nnodes 2 needs --node-rank and --master-addr"),
    (["--nnodes", "2", "--node-rank", "1", "SCRIPT"], "--nnodes 2 needs --node-rank and --master-addr"),
    (["--backend", "mpi", "SCRIPT"], "invalid choice: 'mpi'"),
])
def test_usage_errors(isolated, capsys, argv, fragment):
    argv = [str(isolated) if arg == "SCRIPT" else arg for arg in argv]
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert fragment in capsys.readouterr().err


def test_torchrun_arguments_pass_through(isolated):
    args = cli.build_parser().parse_args(
        ["--nproc-per-node", "8", "--nnodes", "2", "--node-rank", "1", "--master-addr", "node01",
         "--master-port", "29600", str(isolated), "--lr", "0.1"])
    assert cli._torchrun_args(args) == [
        "--nproc-per-node", "8", "--nnodes", "2", "--node-rank", "1", "--master-addr", "node01",
        "--master-port", "29600", str(isolated), "--lr", "0.1"]


def test_torchrun_arguments_single_node_defaults(isolated):
    args = cli.build_parser().parse_args(["--nproc-per-node", "auto", str(isolated)])
    assert cli._torchrun_args(args) == ["--nproc-per-node", "auto", str(isolated)]


def test_script_options_after_the_script_are_not_ours(isolated):
    args = cli.build_parser().parse_args([str(isolated), "--nproc-per-node", "5"])
    assert args.nproc_per_node is None and args.script_args == ["--nproc-per-node", "5"]


def test_templates_are_shipped():
    templates = Path(cli.__file__).parent / "templates"
    names = sorted(p.name for p in templates.iterdir())
    assert "slurm_npu.sbatch" in names and "mpirun_hostfile" in names and "mpirun_npu.sh" in names
    sbatch = (templates / "slurm_npu.sbatch").read_text()
    for fragment in ("HCCL_CONNECT_TIMEOUT", "HCCL_BUFFSIZE", "ASCEND_RT_VISIBLE_DEVICES", "srun"):
        assert fragment in sbatch


def test_errors_from_the_script_are_not_usage_errors(isolated, monkeypatch, tmp_path):
    for name, value in OPEN_MPI_RANK1.items():
        monkeypatch.setenv(name, value)
    script = tmp_path / "fails.py"
    script.write_text("raise ValueError('from the script')\n")
    with pytest.raises(ValueError, match="from the script"):
        cli.main([str(script)])


def test_nproc_per_node_under_mpi_delegates_to_torchrun(isolated, monkeypatch):
    for name, value in OPEN_MPI_RANK1.items():
        monkeypatch.setenv(name, value)
    calls = []
    monkeypatch.setattr(cli, "_run_torchrun", lambda args: calls.append(args) or 0)
    assert cli.main(["--nproc-per-node", "2", str(isolated), "x"]) == 0
    assert calls == [["--nproc-per-node", "2", str(isolated), "x"]]

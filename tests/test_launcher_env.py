"""launcher.env and launcher.slurm: launcher discovery as pure functions over environment tables."""
from __future__ import annotations

import pytest

from launcher.env import DistEnv, local_rank_from_argv, parse_env
from launcher.slurm import expand_hostlist, expand_tasks_per_node, port_from_job_id

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "node01", "MASTER_PORT": "29500", "GROUP_RANK": "1",
            "TORCHELASTIC_USE_AGENT_STORE": "True"}
DEEPSPEED = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": "29500", "CROSS_RANK": "0", "CROSS_SIZE": "1", "LOCAL_SIZE": "2"}
OPEN_MPI = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8",
            "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}
HYDRA = {"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2"}
SLURM = {"SLURM_PROCID": "9", "SLURM_NTASKS": "11", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
         "SLURM_TASKS_PER_NODE": "4(x2),3", "SLURM_JOB_NODELIST": "node[01-03,07]", "SLURM_JOB_ID": "123456"}

GOOD = [
    # (name, environ, argv, expected DistEnv)
    ("torchrun", TORCHRUN, [], DistEnv(3, 8, 1, 2, "node01", 29500, "torchrun")),
    ("deepspeed argv", DEEPSPEED, ["--local_rank=1"], DistEnv(1, 2, 1, 2, "127.0.0.1", 29500, "deepspeed")),
    ("deepspeed argv split", DEEPSPEED, ["--foo", "--local_rank", "1"],
     DistEnv(1, 2, 1, 2, "127.0.0.1", 29500, "deepspeed")),
    ("deepspeed --no_local_rank", DEEPSPEED, [], DistEnv(1, 2, 1, 2, "127.0.0.1", 29500, "deepspeed")),
    ("deepspeed LOCAL_RANK from argv only",
     {k: v for k, v in DEEPSPEED.items() if k != "LOCAL_RANK"}, ["--local-rank=1"],
     DistEnv(1, 2, 1, 2, "127.0.0.1", 29500, "deepspeed")),
    ("torch one rank without master", {"RANK": "0", "WORLD_SIZE": "1"}, [],
     DistEnv(0, 1, 0, None, None, None, "torchrun")),
    ("open mpi, no master", OPEN_MPI, [], DistEnv(5, 8, 1, 4, None, None, "mpi")),
    ("open mpi, master given", {**OPEN_MPI, "MASTER_ADDR": "h0", "MASTER_PORT": "1234"}, [],
     DistEnv(5, 8, 1, 4, "h0", 1234, "mpi")),
    ("mpich hydra", HYDRA, [], DistEnv(2, 4, 0, 2, None, None, "mpi")),
    ("slurm", SLURM, [], DistEnv(9, 11, 1, 3, "node01", port_from_job_id(123456), "slurm")),
    ("slurm master env wins", {**SLURM, "MASTER_ADDR": "ib-node01", "MASTER_PORT": "4000"}, [],
     DistEnv(9, 11, 1, 3, "ib-node01", 4000, "slurm")),
    ("slurm step variables first",
     {**SLURM, "SLURM_STEP_NODELIST": "gpu[5-6]", "SLURM_STEP_NUM_TASKS": "10",
      "SLURM_STEP_TASKS_PER_NODE": "5(x2)", "SLURM_NODEID": "1", "SLURM_PROCID": "7"}, [],
     DistEnv(7, 10, 1, 5, "gpu5", port_from_job_id(123456), "slurm")),
    ("slurm ntasks-per-node", {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1",
                               "SLURM_NTASKS_PER_NODE": "2", "SLURM_NODELIST": "localhost",
                               "SLURM_JOB_ID": "7"}, [],
     DistEnv(1, 2, 1, 2, "localhost", 20007, "slurm")),
    ("slurm batch step of one task", {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0"}, [],
     DistEnv(0, 1, 0, None, None, None, "slurm")),
    ("plain python", {"PATH": "/usr/bin", "HOME": "/root"}, [], DistEnv(0, 1, 0, 1, None, None, "single")),
    ("plain python, --local_rank=0", {}, ["--local_rank=0"], DistEnv(0, 1, 0, 1, None, None, "single")),
    # [Note: launcher precedence]: torch variables, then MPI, then SLURM.
    ("torchrun inside sbatch", {**SLURM, **TORCHRUN}, [], DistEnv(3, 8, 1, 2, "node01", 29500, "torchrun")),
    ("mpirun inside sbatch", {**SLURM, **OPEN_MPI}, [], DistEnv(5, 8, 1, 4, None, None, "mpi")),
    ("open mpi before hydra", {**HYDRA, **OPEN_MPI}, [], DistEnv(5, 8, 1, 4, None, None, "mpi")),
    ("srun --mpi=pmi2 reads SLURM", {**SLURM, "PMI_RANK": "9", "PMI_SIZE": "11"}, [],
     DistEnv(9, 11, 1, 3, "node01", port_from_job_id(123456), "slurm")),
]


@pytest.mark.parametrize("name, environ, argv, expected", GOOD, ids=[row[0] for row in GOOD])
def test_parse_env_good(name, environ, argv, expected):
    assert parse_env(environ, argv) == expected


BAD = [
    # (name, environ, argv, message fragment)
    ("rank >= world size", {**TORCHRUN, "RANK": "8"}, [], "RANK=8 must be < WORLD_SIZE=8"),
    ("negative rank", {**TORCHRUN, "RANK": "-1"}, [], "RANK must be >= 0, got -1"),
    ("non-integer rank", {**TORCHRUN, "RANK": "one"}, [], "RANK must be an integer, got 'one'"),
    ("zero world size", {**TORCHRUN, "RANK": "0", "WORLD_SIZE": "0"}, [], "WORLD_SIZE must be >= 1, got 0"),
    ("rank without world size", {"RANK": "0"}, [], "WORLD_SIZE is not set but RANK is set"),
    ("world size without rank", {"WORLD_SIZE": "2"}, [], "RANK is not set but WORLD_SIZE is set"),
    ("missing MASTER_ADDR", {k: v for k, v in TORCHRUN.items() if k != "MASTER_ADDR"}, [],
     "MASTER_ADDR is not set but WORLD_SIZE=8 > 1"),
    ("missing MASTER_PORT", {k: v for k, v in TORCHRUN.items() if k != "MASTER_PORT"}, [],
     "MASTER_PORT is not set but WORLD_SIZE=8 > 1"),
    ("port out of range", {**TORCHRUN, "MASTER_PORT": "70000"}, [], "MASTER_PORT must be in 1..65535, got 70000"),
    ("non-integer port", {**TORCHRUN, "MASTER_PORT": "http"}, [], "MASTER_PORT must be an integer, got 'http'"),
    ("no local rank", {k: v for k, v in TORCHRUN.items() if k != "LOCAL_RANK"}, [],
     "LOCAL_RANK is not set (nor --local_rank) but WORLD_SIZE=8 > 1"),
    ("local rank >= local world size", {**TORCHRUN, "LOCAL_RANK": "2"}, [],
     "LOCAL_RANK=2 must be < LOCAL_WORLD_SIZE=2"),
    ("local world size > world size", {**TORCHRUN, "LOCAL_WORLD_SIZE": "9"}, [],
     "LOCAL_WORLD_SIZE=9 must be in 1..WORLD_SIZE=8"),
    ("argv disagrees", DEEPSPEED, ["--local_rank=0"], "--local_rank=0 disagrees with the deepspeed local rank 1"),
    ("argv not an integer", DEEPSPEED, ["--local_rank=x"], "--local_rank must be an integer, got 'x'"),
    ("argv without value", DEEPSPEED, ["--local_rank"], "--local_rank is given without a value"),
    ("argv without launcher", {}, ["--local_rank=3"], "--local_rank=3 is given but no launcher variables"),
    ("open mpi rank >= size", {**OPEN_MPI, "OMPI_COMM_WORLD_RANK": "8"}, [],
     "OMPI_COMM_WORLD_RANK=8 must be < OMPI_COMM_WORLD_SIZE=8"),
    ("open mpi local rank missing", {k: v for k, v in OPEN_MPI.items() if k != "OMPI_COMM_WORLD_LOCAL_RANK"}, [],
     "OMPI_COMM_WORLD_LOCAL_RANK is not set"),
    ("hydra local rank >= local size", {**HYDRA, "MPI_LOCALRANKID": "2"}, [],
     "MPI_LOCALRANKID=2 must be < MPI_LOCALNRANKS=2"),
    ("slurm procid >= ntasks", {**SLURM, "SLURM_PROCID": "11"}, [], "SLURM_PROCID=11 must be < SLURM_NTASKS=11"),
    ("slurm localid >= tasks on node", {**SLURM, "SLURM_LOCALID": "3"}, [],
     "SLURM_LOCALID=3 must be < SLURM_TASKS_PER_NODE[SLURM_NODEID=2]=3"),
    ("slurm node id beyond list", {**SLURM, "SLURM_NODEID": "3"}, [], "SLURM_NODEID=3 must be < the 3 nodes"),
    ("slurm no nodelist", {k: v for k, v in SLURM.items() if k != "SLURM_JOB_NODELIST"}, [],
     "MASTER_ADDR is not set and neither is any of"),
    ("slurm no job id", {k: v for k, v in SLURM.items() if k != "SLURM_JOB_ID"}, [],
     "neither MASTER_PORT nor SLURM_JOB_ID (to derive a port from) is set"),
    ("slurm bad nodelist", {**SLURM, "SLURM_JOB_NODELIST": "node[01-03"}, [], "unmatched '['"),
    ("slurm bad tasks per node", {**SLURM, "SLURM_TASKS_PER_NODE": "4(2)"}, [], "bad item '4(2)'"),
    ("slurm localid missing", {k: v for k, v in SLURM.items() if k != "SLURM_LOCALID"}, [],
     "SLURM_LOCALID is not set"),
]


@pytest.mark.parametrize("name, environ, argv, fragment", BAD, ids=[row[0] for row in BAD])
def test_parse_env_bad(name, environ, argv, fragment):
    with pytest.raises(ValueError) as info:
        parse_env(environ, argv)
    assert fragment in str(info.value)


def test_dist_env_validates_direct_construction():
    with pytest.raises(ValueError, match="rank=2 must be < world_size=2"):
        DistEnv(2, 2, 0, None, "h", 1, "torchrun")
    with pytest.raises(ValueError, match="source must be one of"):
        DistEnv(0, 1, 0, None, None, None, "pbs")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="master_port must be in 1..65535, got 0"):
        DistEnv(0, 2, 0, None, "h", 0, "mpi")


def test_parse_env_never_reads_the_process_environment(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert parse_env({}).source == "single"


@pytest.mark.parametrize("argv, expected", [
    ([], None), (["--local_rank=2"], 2), (["--local-rank", "3"], 3), (["--lr", "0.1"], None),
    (["--local_rankx=1"], None),
])
def test_local_rank_from_argv(argv, expected):
    assert local_rank_from_argv(argv) == expected


HOSTLISTS = [
    ("localhost", ["localhost"]),
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("node[08-10]", ["node08", "node09", "node10"]),
    ("a1,b[2-3],c", ["a1", "b2", "b3", "c"]),
    ("rack[1-2]-n[1,3]", ["rack1-n1", "rack1-n3", "rack2-n1", "rack2-n3"]),
    ("gpu[7]", ["gpu7"]),
    (" node[1-2] ", ["node1", "node2"]),
]


@pytest.mark.parametrize("text, expected", HOSTLISTS)
def test_expand_hostlist(text, expected):
    assert expand_hostlist(text) == expected


@pytest.mark.parametrize("text, fragment", [
    ("", "is empty"),
    ("node[1-2", "unmatched '['"),
    ("node1-2]", "unmatched ']'"),
    ("node[3-1]", "runs backwards"),
    ("node[a-b]", "bad range 'a-b'"),
    ("node1,,node2", "empty entry"),
])
def test_expand_hostlist_bad(text, fragment):
    with pytest.raises(ValueError) as info:
        expand_hostlist(text, var="SLURM_NODELIST")
    assert fragment in str(info.value) and "SLURM_NODELIST" in str(info.value)


@pytest.mark.parametrize("text, expected", [
    ("4", [4]), ("4(x2),3", [4, 4, 3]), ("2(x3)", [2, 2, 2]), ("1,2,3", [1, 2, 3]),
])
def test_expand_tasks_per_node(text, expected):
    assert expand_tasks_per_node(text) == expected


@pytest.mark.parametrize("text", ["", "4(x)", "x", "4(x2)3", "-1"])
def test_expand_tasks_per_node_bad(text):
    with pytest.raises(ValueError, match="is not a tasks-per-node list"):
        expand_tasks_per_node(text)


def test_port_from_job_id_is_deterministic_and_below_ephemeral_range():
    ports = {port_from_job_id(job_id) for job_id in range(0, 50000, 7)}
    assert min(ports) >= 20000 and max(ports) < 30000
    assert port_from_job_id(123456) == port_from_job_id(123456) == 23456

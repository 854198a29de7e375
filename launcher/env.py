"""Pure discovery of a process's place in a job from its environment mapping and argv.

[Note: launcher precedence]
Several launchers can leave variables in one environment (torchrun inside an sbatch
allocation sees both RANK and SLURM_PROCID; ``mpirun`` under SLURM sees OMPI_* and SLURM_*).
The first family present wins:

1. torch variables ``RANK``/``WORLD_SIZE`` (torchrun, the deepspeed launcher, hand-set),
2. MPI: Open MPI ``OMPI_COMM_WORLD_*``, then MPICH / Intel MPI (Hydra) ``PMI_RANK``,
   ``PMI_SIZE`` with ``MPI_LOCALRANKID``,
3. SLURM ``srun``: ``SLURM_PROCID`` with ``SLURM_NTASKS`` (or ``SLURM_STEP_NUM_TASKS``),
4. none of these: a single rank.

The launcher that started the process sets the most specific variables, and an outer
allocation's variables describe the allocation, not this process: so the innermost launcher
(torch variables) wins. Nothing here reads ``os.environ``: callers pass the mapping.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

from launcher.slurm import expand_hostlist, expand_tasks_per_node, port_from_job_id

__all__ = ["SOURCES", "DistEnv", "Source", "local_rank_from_argv", "parse_env"]

Source = Literal["torchrun", "mpi", "slurm", "deepspeed", "single"]
SOURCES: tuple[str, ...] = ("torchrun", "mpi", "slurm", "deepspeed", "single")

_NODELIST_VARS = ("SLURM_STEP_NODELIST", "SLURM_NODELIST", "SLURM_JOB_NODELIST")
_TASKS_PER_NODE_VARS = ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job, as its launcher described it.

    Attributes:
        rank: global rank, ``0 <= rank < world_size``.
        world_size: number of ranks in the job.
        local_rank: rank among the ranks on this node; picks the device.
        local_world_size: ranks on this node, or None when the launcher does not say.
        master_addr: rendezvous host (rank 0's), or None when not known yet (MPI without
            MASTER_ADDR: resolved by broadcast) or not needed (a single rank).
        master_port: rendezvous port, or None in the same cases as ``master_addr``.
        source: which launcher family the values came from (see [Note: launcher precedence]).
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int | None
    master_addr: str | None
    master_port: int | None
    source: Source

    def __post_init__(self) -> None:
        _check_layout(
            self.rank, self.world_size, self.local_rank, self.local_world_size,
            names=("rank", "world_size", "local_rank", "local_world_size"),
        )
        if self.master_port is not None and not 0 < self.master_port < 65536:
            raise ValueError(f"master_port must be in 1..65535, got {self.master_port}")
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {self.source!r}")


def _check_layout(
    rank: int, world_size: int, local_rank: int, local_world_size: int | None,
    *, names: tuple[str, str, str, str],
) -> None:
    """Raise ValueError, naming the launcher's own variables, if the four numbers disagree."""
    rank_var, size_var, local_var, local_size_var = names
    for var, value in ((rank_var, rank), (local_var, local_rank)):
        if value < 0:
            raise ValueError(f"{var} must be >= 0, got {value}")
    if world_size < 1:
        raise ValueError(f"{size_var} must be >= 1, got {world_size}")
    if rank >= world_size:
        raise ValueError(f"{rank_var}={rank} must be < {size_var}={world_size}")
    if local_world_size is not None:
        if not 1 <= local_world_size <= world_size:
            raise ValueError(f"{local_size_var}={local_world_size} must be in 1..{size_var}={world_size}")
        if local_rank >= local_world_size:
            raise ValueError(f"{local_var}={local_rank} must be < {local_size_var}={local_world_size}")


def _read_int(environ: Mapping[str, str], var: str) -> int | None:
    """The integer value of ``var``, or None when unset; ValueError naming it when malformed."""
    raw = environ.get(var)
    if raw is None:
        return None
    try:
        return int(raw.strip())
    except ValueError:
        raise ValueError(f"{var} must be an integer, got {raw!r}") from None


def _require_int(environ: Mapping[str, str], var: str, *, because: str) -> int:
    value = _read_int(environ, var)
    if value is None:
        raise ValueError(f"{var} is not set but {because}")
    return value


def local_rank_from_argv(argv: Sequence[str]) -> int | None:
    """The value of ``--local_rank`` (or ``--local-rank``) in ``argv``, as the deepspeed launcher passes it.

    Args:
        argv: the script's arguments (``sys.argv[1:]``).

    Returns:
        The integer given, or None when the flag is absent.

    Raises:
        ValueError: the flag has no value or a non-integer one.
    """
    for index, arg in enumerate(argv):
        for flag in ("--local_rank", "--local-rank"):
            if arg == flag:
                if index + 1 >= len(argv):
                    raise ValueError(f"{flag} is given without a value")
                raw = argv[index + 1]
            elif arg.startswith(flag + "="):
                raw = arg[len(flag) + 1 :]
            else:
                continue
            try:
                return int(raw)
            except ValueError:
                raise ValueError(f"{flag} must be an integer, got {raw!r}") from None
    return None


def _master(
    environ: Mapping[str, str], world_size: int, *, required: bool, size_var: str
) -> tuple[str | None, int | None]:
    """MASTER_ADDR / MASTER_PORT from the environment; both required for several ranks if ``required``."""
    addr = environ.get("MASTER_ADDR") or None
    port = _read_int(environ, "MASTER_PORT")
    if required and world_size > 1:
        if addr is None:
            raise ValueError(f"MASTER_ADDR is not set but {size_var}={world_size} > 1: set it to rank 0's host")
        if port is None:
            raise ValueError(f"MASTER_PORT is not set but {size_var}={world_size} > 1: "
                             "set it to a free port on rank 0's host")
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"MASTER_PORT must be in 1..65535, got {port}")
    return addr, port


def _from_torch(environ: Mapping[str, str], argv_local_rank: int | None) -> DistEnv:
    rank = _require_int(environ, "RANK", because="WORLD_SIZE is set")
    world_size = _require_int(environ, "WORLD_SIZE", because="RANK is set")
    local_rank = _read_int(environ, "LOCAL_RANK")
    if local_rank is None:
        local_rank = argv_local_rank
    if local_rank is None:
        if world_size > 1:
            raise ValueError(f"LOCAL_RANK is not set (nor --local_rank) but WORLD_SIZE={world_size} > 1: "
                             "cannot pick a device")
        local_rank = 0
    local_world_size = _read_int(environ, "LOCAL_WORLD_SIZE")
    local_size_var = "LOCAL_WORLD_SIZE"
    if local_world_size is None:  # the deepspeed launcher's name for it
        local_world_size, local_size_var = _read_int(environ, "LOCAL_SIZE"), "LOCAL_SIZE"
    _check_layout(rank, world_size, local_rank, local_world_size,
                  names=("RANK", "WORLD_SIZE", "LOCAL_RANK", local_size_var))
    addr, port = _master(environ, world_size, required=True, size_var="WORLD_SIZE")
    # The deepspeed launcher passes --local_rank (unless --no_local_rank) and sets CROSS_RANK.
    deepspeed = argv_local_rank is not None or "CROSS_RANK" in environ
    return DistEnv(rank, world_size, local_rank, local_world_size, addr, port,
                   "deepspeed" if deepspeed else "torchrun")


def _from_mpi(environ: Mapping[str, str], names: tuple[str, str, str, str]) -> DistEnv:
    rank_var, size_var, local_var, local_size_var = names
    rank = _require_int(environ, rank_var, because=f"{size_var} is set")
    world_size = _require_int(environ, size_var, because=f"{rank_var} is set")
    local_rank = _require_int(environ, local_var, because=f"{size_var} is set")
    local_world_size = _read_int(environ, local_size_var)
    _check_layout(rank, world_size, local_rank, local_world_size, names=names)
    # Without MASTER_ADDR/PORT, rank 0 broadcasts them over MPI (launcher.mpi).
    addr, port = _master(environ, world_size, required=False, size_var=size_var)
    return DistEnv(rank, world_size, local_rank, local_world_size, addr, port, "mpi")


def _slurm_local_world_size(environ: Mapping[str, str]) -> tuple[int | None, str]:
    """This node's task count and a name for it in messages; the step's own layout first."""
    for var in _TASKS_PER_NODE_VARS:
        if var in environ:
            counts = expand_tasks_per_node(environ[var], var=var)
            node_id = _read_int(environ, "SLURM_NODEID")
            if node_id is None:
                return (counts[0] if len(counts) == 1 else None), var
            if node_id >= len(counts):
                raise ValueError(f"SLURM_NODEID={node_id} must be < the {len(counts)} nodes in {var}={environ[var]!r}")
            return counts[node_id], f"{var}[SLURM_NODEID={node_id}]"
    return _read_int(environ, "SLURM_NTASKS_PER_NODE"), "SLURM_NTASKS_PER_NODE"


def _from_slurm(environ: Mapping[str, str]) -> DistEnv:
    size_var = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in environ else "SLURM_NTASKS"
    rank = _require_int(environ, "SLURM_PROCID", because="this is a SLURM step")
    world_size = _require_int(environ, size_var, because="SLURM_PROCID is set")
    local_rank = _require_int(environ, "SLURM_LOCALID", because="SLURM_PROCID is set")
    local_world_size, local_size_var = _slurm_local_world_size(environ)
    _check_layout(rank, world_size, local_rank, local_world_size,
                  names=("SLURM_PROCID", size_var, "SLURM_LOCALID", local_size_var))
    addr, port = _master(environ, world_size, required=False, size_var=size_var)
    if world_size > 1 and addr is None:
        nodelist_var = next((var for var in _NODELIST_VARS if environ.get(var)), None)
        if nodelist_var is None:
            raise ValueError(f"MASTER_ADDR is not set and neither is any of {_NODELIST_VARS} "
                             f"but {size_var}={world_size} > 1: cannot find rank 0's host")
        # Rank 0 runs on the first node of the step (SLURM's default block distribution).
        addr = expand_hostlist(environ[nodelist_var], var=nodelist_var)[0]
    if world_size > 1 and port is None:
        job_id = _read_int(environ, "SLURM_JOB_ID")
        if job_id is None:
            raise ValueError(f"neither MASTER_PORT nor SLURM_JOB_ID (to derive a port from) is set "
                             f"but {size_var}={world_size} > 1")
        port = port_from_job_id(job_id)
    return DistEnv(rank, world_size, local_rank, local_world_size, addr, port, "slurm")


def parse_env(environ: Mapping[str, str], argv: Sequence[str] = ()) -> DistEnv:
    """Work out this process's rank, world size, local rank and rendezvous from its launcher's variables.

    The first family of variables present wins; see [Note: launcher precedence].

    Args:
        environ: the environment, e.g. ``dict(os.environ)``; never read from the process.
        argv: the script's arguments, searched for the deepspeed launcher's ``--local_rank=N``.

    Returns:
        The job layout. ``source`` names the family used; with none present it is a single
        rank (``source="single"``, no rendezvous address).

    Raises:
        ValueError: a variable is malformed or the variables contradict each other (the
            message names the variables and their values).
    """
    argv_local_rank = local_rank_from_argv(argv)
    if "RANK" in environ or "WORLD_SIZE" in environ:
        dist_env = _from_torch(environ, argv_local_rank)
    elif "OMPI_COMM_WORLD_SIZE" in environ or "OMPI_COMM_WORLD_RANK" in environ:
        dist_env = _from_mpi(environ, ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                                       "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"))
    elif "PMI_SIZE" in environ and "MPI_LOCALRANKID" in environ:
        # Hydra (MPICH, Intel MPI) sets MPI_LOCALRANKID; srun --mpi=pmi2 sets PMI_* without it
        # and is then read through the SLURM variables instead.
        dist_env = _from_mpi(environ, ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"))
    elif "SLURM_PROCID" in environ:
        dist_env = _from_slurm(environ)
    else:
        if argv_local_rank not in (None, 0):
            raise ValueError(f"--local_rank={argv_local_rank} is given but no launcher variables "
                             "(RANK/WORLD_SIZE, OMPI_COMM_WORLD_*, PMI_*, SLURM_PROCID) are set")
        return DistEnv(0, 1, 0, 1, None, None, "single")
    if argv_local_rank is not None and argv_local_rank != dist_env.local_rank:
        raise ValueError(f"--local_rank={argv_local_rank} disagrees with the {dist_env.source} "
                         f"local rank {dist_env.local_rank}")
    return dist_env

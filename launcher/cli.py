"""The ``python -m launcher`` / ``sharded-fused-adam-launch`` command line.

[Note: launcher CLI modes]
- Started by mpirun/mpiexec or srun (MPI or SLURM variables present) without
  ``--nproc-per-node``: this process already is one rank, so the script runs in this very
  process (``runpy``), one rank per MPI/SLURM task. In-process rather than as a child
  because a child of an MPI process cannot use that process's MPI (mpi4py in the script,
  or our rendezvous broadcast, needs the MPI_Init of the process mpirun started).
- Otherwise: start ``--nproc-per-node`` local ranks by delegating to
  ``torch.distributed.run`` (torchrun), also for multi-node (``--nnodes`` etc.).
"""
from __future__ import annotations

import argparse
import os
import runpy
import sys
from typing import Sequence

from launcher.device import BACKENDS, DEVICE_TYPES
from launcher.env import parse_env

__all__ = ["build_parser", "main"]

_OUTER_LAUNCHERS = ("mpi", "slurm")


def _nproc(value: str) -> str:
    if value != "auto" and not (value.isdigit() and int(value) > 0):
        raise argparse.ArgumentTypeError(f"--nproc-per-node must be a positive integer or 'auto', got {value!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(
        prog="sharded-fused-adam-launch",
        description="Run a training script on several ranks: N local ranks through torchrun, or one rank "
                    "per task when started by mpirun/mpiexec or srun.",
        allow_abbrev=False,
    )
    parser.add_argument("--nproc-per-node", type=_nproc, default=None,
                        help="ranks to start on this node (default 1); "
                             "'auto': one per accelerator, else one per CPU core")
    parser.add_argument("--nnodes", default=None, help="number of nodes (torchrun's --nnodes; default 1)")
    parser.add_argument("--node-rank", type=int, default=None, help="this node's index, 0..nnodes-1")
    parser.add_argument("--master-addr", default=None, help="host of node 0 (required with --nnodes > 1)")
    parser.add_argument("--master-port", type=int, default=None, help="free port on node 0 (default 29500)")
    parser.add_argument("--backend", choices=BACKENDS, default=None, help="sets SFA_BACKEND for the ranks")
    parser.add_argument("--device", choices=DEVICE_TYPES, default=None, help="sets SFA_DEVICE for the ranks")
    parser.add_argument("--rendezvous-timeout", type=float, default=None,
                        help="seconds ranks wait for each other at start-up (sets SFA_RENDEZVOUS_TIMEOUT)")
    parser.add_argument("script", help="the training script")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments passed to the script")
    return parser


def _exit_code(code: object) -> int:
    """The process exit status ``sys.exit(code)`` would give."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _run_in_process(script: str, script_args: Sequence[str]) -> int:
    """Run ``script`` as ``__main__`` here, as ``python script args...`` would."""
    sys.argv = [script, *script_args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exit_:
        return _exit_code(exit_.code)
    return 0


def _torchrun_args(args: argparse.Namespace) -> list[str]:
    multi_node = args.nnodes is not None and args.nnodes != "1"
    if multi_node and (args.master_addr is None or args.node_rank is None):
        raise ValueError(f"--nnodes {args.nnodes} needs --node-rank and --master-addr (node 0's host)")
    flags = {"--nproc-per-node": args.nproc_per_node, "--nnodes": args.nnodes, "--node-rank": args.node_rank,
             "--master-addr": args.master_addr, "--master-port": args.master_port}
    torchrun_args: list[str] = []
    for flag, value in flags.items():
        if value is not None:
            torchrun_args += [flag, str(value)]
    return [*torchrun_args, args.script, *args.script_args]


def _run_torchrun(torchrun_args: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main(torchrun_args)
    except ChildFailedError as err:
        print(err, file=sys.stderr)
        _, failure = err.get_first_failure()
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the launcher CLI (see [Note: launcher CLI modes]).

    Args:
        argv: the arguments without the program name; None reads ``sys.argv[1:]``.

    Returns:
        The exit status: the script's, or the first failed rank's under torchrun.

    Raises:
        SystemExit: status 2 for a usage error (argparse), with the reason on stderr.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not os.path.isfile(args.script):
        parser.error(f"script {args.script!r} does not exist")
    overrides = {"SFA_BACKEND": args.backend, "SFA_DEVICE": args.device,
                 "SFA_RENDEZVOUS_TIMEOUT": args.rendezvous_timeout}
    for name, value in overrides.items():
        if value is not None:
            os.environ[name] = str(value)
    try:
        outer = parse_env(os.environ) if args.nproc_per_node is None else None
        in_process = outer is not None and outer.source in _OUTER_LAUNCHERS
        if in_process and (args.nnodes is not None or args.node_rank is not None):
            raise ValueError(f"this process is already rank {outer.rank} of {outer.world_size} "
                             f"(started by {outer.source}): --nnodes/--node-rank apply only with --nproc-per-node")
        torchrun_args = [] if in_process else _torchrun_args(args)
    except ValueError as err:
        parser.error(str(err))
    if in_process:
        # Here --master-addr/--master-port name the rendezvous directly (no MPI broadcast needed).
        for name, value in (("MASTER_ADDR", args.master_addr), ("MASTER_PORT", args.master_port)):
            if value is not None:
                os.environ[name] = str(value)
        return _run_in_process(args.script, args.script_args)
    return _run_torchrun(torchrun_args)

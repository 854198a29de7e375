"""Exceptions the launcher raises when the machine, not the user's arguments, is at fault.

Inconsistent launcher variables and bad arguments are ``ValueError``; everything here is
a ``RuntimeError`` because retrying with the same inputs on a fixed machine would work.
"""
from __future__ import annotations

__all__ = ["BackendUnavailableError", "LaunchError", "MPIUnavailableError", "RendezvousError"]


class LaunchError(RuntimeError):
    """Base class: the launcher could not set up the distributed job."""


class BackendUnavailableError(LaunchError):
    """An explicitly requested backend or device is not present on this machine."""


class MPIUnavailableError(LaunchError):
    """The process runs under an MPI launcher but mpi4py or the MPI library is missing."""


class RendezvousError(LaunchError):
    """The ranks did not all meet at the rendezvous address within the timeout."""

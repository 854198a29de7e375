"""Checkpoint conversion across ecosystems: DeepSpeed ZeRO 0-2 and universal checkpoints,
torch.distributed.checkpoint, our sharded and gathered formats; at any world size, streamed.

Every reader returns a lazily read ``NamedState`` keyed by param FQN (see [Note: named
optimizer state] in ``state.py``); ``load_named`` puts one into a live ``ShardedFusedAdam``,
each rank reading only its own ranges; every writer streams one from disk to disk. DCP
is also saved and loaded live (``save_dcp``/``load_dcp``), each rank writing its own bytes.
DeepSpeed itself is never needed to read or write (only to run the resulting engine).
"""
from __future__ import annotations

from .apply import load_named, param_fqns
from .dcp import load_dcp, read_dcp, save_dcp, write_dcp
from .deepspeed import read_deepspeed
from .deepspeed_write import write_deepspeed
from .ours import read_ours, read_torch, write_ours, write_torch
from .state import CheckpointError, NamedState, check_complete
from .universal import read_universal, write_universal

__all__ = ["NamedState", "CheckpointError", "check_complete", "load_named", "param_fqns",
           "read_deepspeed", "write_deepspeed", "read_universal", "write_universal",
           "save_dcp", "load_dcp", "read_dcp", "write_dcp", "read_ours", "read_torch", "write_ours", "write_torch"]

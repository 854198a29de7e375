"""Checkpoint conversion across ecosystems: DeepSpeed ZeRO 0-2 and universal checkpoints,
torch.distributed.checkpoint, our sharded and gathered formats; at any world size, streamed.

Every reader returns a lazily read ``NamedState`` keyed by param FQN (see [Note: named
optimizer state] in ``state.py``); ``load_named`` puts one into a live ``ShardedFusedAdam``,
each rank reading only its own ranges; every writer streams one from disk to disk. DCP
is also saved and loaded live (``save_dcp``/``load_dcp``), each rank writing its own bytes.
DeepSpeed itself is never needed to read or write (only to run the resulting engine).
Submodules are imported on first use, so ``sharded-fused-adam-checkpoint`` starts fast.
"""
from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "NamedState": "state", "CheckpointError": "state", "check_complete": "state",
    "load_named": "apply", "param_fqns": "apply",
    "read_deepspeed": "deepspeed", "write_deepspeed": "deepspeed_write",
    "read_universal": "universal", "write_universal": "universal",
    "save_dcp": "dcp", "load_dcp": "dcp", "read_dcp": "dcp", "write_dcp": "dcp",
    "read_ours": "ours", "read_torch": "ours", "write_ours": "ours", "write_torch": "ours",
}

__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)

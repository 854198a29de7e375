"""sharded_fused_adam: a ZeRO-style sharded fused Adam optimizer for NPU (HCCL), CUDA (NCCL) and CPU (gloo)."""
from __future__ import annotations

from .checkpoint.gathered import load_full, save_full
from .numerics.clip import clip_grad_norm_, clip_grad_value_
from .comm.failures import CollectiveError
from .local_adam import FusedAdam
from .optimizer import ShardedFusedAdam, ShardedFusedAdamW
from .options import ShardingOptions
from .checkpoint.files import CheckpointWriteError
from .checkpoint.sharded import (CheckpointError, CheckpointFileMissing, CheckpointLockedError, consolidate_sharded,
                                 load_sharded, save_sharded)
from .numerics.precision import DynamicLossScaler, LossScaler, StaticLossScaler

__version__ = "0.1.0"

__all__ = [
    "ShardedFusedAdam",
    "ShardedFusedAdamW",
    "ShardingOptions",
    "clip_grad_norm_",
    "clip_grad_value_",
    "FusedAdam",
    "LossScaler",
    "StaticLossScaler",
    "DynamicLossScaler",
    "save_full",
    "load_full",
    "save_sharded",
    "load_sharded",
    "consolidate_sharded",
    "CheckpointError",
    "CheckpointFileMissing",
    "CheckpointLockedError",
    "CheckpointWriteError",
    "CollectiveError",
    "__version__",
]

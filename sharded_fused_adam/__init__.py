"""sharded_fused_adam: a ZeRO-style sharded fused Adam optimizer for NPU (HCCL), CUDA (NCCL) and CPU (gloo)."""
from __future__ import annotations

from .optimizer import ShardedFusedAdam, ShardedFusedAdamW
from .precision import DynamicLossScaler, LossScaler, StaticLossScaler

__version__ = "0.1.0"

__all__ = [
    "ShardedFusedAdam",
    "ShardedFusedAdamW",
    "LossScaler",
    "StaticLossScaler",
    "DynamicLossScaler",
    "__version__",
]

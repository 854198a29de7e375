"""Integrations with training frameworks; each optional dependency is imported lazily by its own module.

``sharded_fused_adam.integrations.deepspeed``: ``"type": "ShardedFusedAdam"`` in a DeepSpeed
config (``initialize``, ``register``, ``wire``); see ``docs/deepspeed.md``.
"""
from __future__ import annotations

__all__: list[str] = []

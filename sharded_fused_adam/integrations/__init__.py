"""Integrations with training frameworks; each optional dependency is imported lazily by its own module.

``sharded_fused_adam.integrations.deepspeed``: ``"type": "ShardedFusedAdam"`` in a DeepSpeed
config (``initialize``, ``register``, ``wire``); see ``docs/deepspeed.md``.
``sharded_fused_adam.integrations.transformers``: ``Trainer`` and ``ShardedFusedAdamCallback``
for the Hugging Face Trainer; ``sharded_fused_adam.integrations.accelerate``: ``make_optimizer``
for Accelerate loops; see ``docs/integrations.md``. Nothing here is imported by the core.
"""
from __future__ import annotations

__all__: list[str] = []

"""Stage-0 engines built by DeepSpeed itself: precision takeover and wiring at construction.

[Note: engine construction]
Frameworks (the Hugging Face Trainer, Accelerate) call ``deepspeed.initialize`` themselves and
never hand the engine back before training starts, and real configs enable ``"bf16"`` or
``"fp16"``, which at ZeRO stage 0 would make DeepSpeed wrap our optimizer in its
``FP16_Optimizer`` (a second fp32 master copy, its own scaling and clipping, and a ``step()``
with zero gradients at start-up). ``register`` therefore extends
``DeepSpeedEngine._configure_optimizer``, the one engine method that builds the optimizer,
and only for stage-0 engines whose optimizer is ours:

* before it runs, the engine has already cast the module to fp16/bf16 (``_configure_distributed_model``);
  the fp16/bf16 flags of the engine's config are switched off so that no wrapper is built,
  and an fp16 section becomes the optimizer's loss scaler (``loss_scale: 0`` -> dynamic with
  the section's ``initial_scale_power``, ``loss_scale_window``, ``hysteresis`` and
  ``min_loss_scale``; a number -> static). ``ShardedFusedAdam`` keeps fp32 master shards;
* the engine's ``mpu`` (``deepspeed.initialize(mpu=...)``) is handed to the optimizer, which then
  shards over its data-parallel group and agrees on norms and overflows with its model-parallel
  group (docs/parallelism.md);
* after it runs, the engine is wired (``ShardedMode.wire``).

Engines with any other optimizer, or at stages 1/2, go through DeepSpeed's code untouched.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

from ..optimizer import ShardedFusedAdam
from ..numerics.precision import DynamicLossScaler, LossScaler, StaticLossScaler
from .deepspeed_modes import OPTIMIZER_NAMES, mode_for_engine, pending_loss_scale

__all__ = ["install"]

_EXTENDED = "_sharded_fused_adam_extended"


def _loss_scaler_from_fp16(engine: Any) -> LossScaler:
    """Our loss scaler for the engine's fp16 section (DeepSpeed's names, DeepSpeed's semantics)."""
    if not engine.dynamic_loss_scale():
        return StaticLossScaler(float(engine.loss_scale()))
    args = engine.dynamic_loss_scale_args()
    if args["consecutive_hysteresis"]:
        raise ValueError('fp16.consecutive_hysteresis: true is not supported with ShardedFusedAdam at ZeRO stage 0 '
                         "(its dynamic loss scaler restores the hysteresis only when the scale grows): drop it")
    return DynamicLossScaler(float(args["init_scale"]), growth_interval=int(args["scale_window"]),
                             hysteresis=int(args["delayed_shift"]), min_scale=float(args["min_scale"]))


def _builds_ours(engine: Any, client_optimizer: Any) -> bool:
    if int(engine.zero_optimization_stage()) != 0:
        return False
    if client_optimizer is None:
        return engine.optimizer_name() in OPTIMIZER_NAMES
    return isinstance(client_optimizer, ShardedFusedAdam)


def _take_over_precision(engine: Any, client_optimizer: Any) -> Optional[LossScaler]:
    """Switch the engine's fp16/bf16 flags off; return the loss scaler an fp16 section asks for."""
    config = engine._config
    fp16, bf16 = config.float16_config.enabled, config.bfloat16_config.enabled
    if not (fp16 or bf16):
        return None
    if client_optimizer is not None:
        raise ValueError(f'the DeepSpeed config enables "{"fp16" if fp16 else "bf16"}" at ZeRO stage 0 with a '
                         "ShardedFusedAdam passed as optimizer=...: DeepSpeed casts the model after that optimizer "
                         "packed its params. Name the optimizer in the config instead (\"type\": "
                         "\"ShardedFusedAdam\"), or cast the model before building the optimizer and drop the section")
    scaler = _loss_scaler_from_fp16(engine) if fp16 else None
    config.float16_config.enabled = False
    config.bfloat16_config.enabled = False
    return scaler


def _extend(original: Any) -> Any:
    @functools.wraps(original)
    def _configure_optimizer(engine: Any, client_optimizer: Any, model_parameters: Any) -> Any:
        if not _builds_ours(engine, client_optimizer):
            return original(engine, client_optimizer, model_parameters)
        with pending_loss_scale(_take_over_precision(engine, client_optimizer), getattr(engine, "mpu", None)):
            result = original(engine, client_optimizer, model_parameters)
        mode_for_engine(engine).wire(engine)
        return result

    setattr(_configure_optimizer, _EXTENDED, True)
    return _configure_optimizer


def install() -> None:
    """Extend ``DeepSpeedEngine._configure_optimizer`` (see [Note: engine construction]); idempotent."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    current = DeepSpeedEngine._configure_optimizer
    if not getattr(current, _EXTENDED, False):
        DeepSpeedEngine._configure_optimizer = _extend(current)

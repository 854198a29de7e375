"""The two ways a DeepSpeed engine can run our Adam, as strategies: config checks, optimizer
construction from the config's ``params``, and the wiring of a built engine.

Pure with respect to DeepSpeed: nothing here imports it. The engine is only touched through
the attributes named in ``docs/deepspeed.md`` ("Engine behaviours relied on").

[Note: two modes]
* ``ShardedMode`` (``zero_optimization.stage`` 0 or absent): DeepSpeed hands our optimizer
  its params unwrapped (fp16/bf16 sections included, see [Note: engine construction] in
  deepspeed_engine.py); ``ShardedFusedAdam`` shards, reduces, unscales and clips, so the
  engine's own gradient all-reduce and clipping are switched off and its ``zero_grad`` /
  ``backward`` / ``no_sync`` are extended to reach the optimizer.
* ``DelegatedMode`` (stage 1 or 2): DeepSpeed shards, reduces and clips, then steps a local
  optimizer on its flat fp32 partitions (see [Note: delegated mode] in local_adam.py), so the
  optimizer is ``FusedAdam`` and nothing needs wiring.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import threading
from typing import Any, Iterator, Mapping, Optional

import torch
import torch.distributed as dist

from ..local_adam import FusedAdam
from ..optimizer import ShardedFusedAdam
from ..numerics.precision import LossScaler

__all__ = ["OPTIMIZER_NAMES", "ShardedMode", "DelegatedMode", "DeepSpeedShardedFusedAdam", "zero_stage",
           "mode_for_config", "optimizer_type", "mode_for_engine", "pending_loss_scaler", "pending_loss_scale"]

_local = threading.local()  # the loss scaler and mpu of an engine under construction (deepspeed_engine.py)


def pending_loss_scaler() -> Optional[LossScaler]:
    """The loss scaler the engine being built asks for (its fp16 section), else None."""
    return getattr(_local, "loss_scaler", None)


@contextlib.contextmanager
def pending_loss_scale(scaler: Optional[LossScaler], mpu: Any = None) -> Iterator[None]:
    """Within, ``pending_loss_scaler()`` returns ``scaler`` and the optimizer built gets the
    engine's ``mpu`` (``deepspeed.initialize(mpu=...)``: see docs/parallelism.md), in this thread."""
    _local.loss_scaler, _local.mpu = scaler, mpu
    try:
        yield
    finally:
        _local.loss_scaler, _local.mpu = None, None

logger = logging.getLogger(__name__)

OPTIMIZER_NAMES = ("ShardedFusedAdam", "ShardedFusedAdamW")
COMMON_KEYS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "adam_w_mode", "kernel")
SHARDED_ONLY_KEYS = ("bucket_cap_mb", "overlap", "reduce_dtype", "comm", "loss_scale", "collective_timeout")
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}
_WIRED = "_sharded_fused_adam_wired"  # engine attribute: wire() already ran


def zero_stage(config: Mapping[str, Any]) -> int:
    """The ZeRO stage a DeepSpeed config asks for (0 when absent; DeepSpeed reads a bare bool as 0/1)."""
    zero = config.get("zero_optimization", {})
    if isinstance(zero, bool):
        return int(zero)
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or not isinstance(stage, int):
        raise ValueError(f"zero_optimization.stage must be an integer, got {stage!r}")
    return stage


def optimizer_type(config: Mapping[str, Any]) -> str | None:
    """The config's ``optimizer.type`` if it names one of ours, else None.

    Raises:
        ValueError: the type is one of our names spelled in another case (DeepSpeed looks
            unknown names up in ``torch.optim`` case-sensitively).
    """
    name = (config.get("optimizer") or {}).get("type")
    if name in OPTIMIZER_NAMES:
        return name
    for ours in OPTIMIZER_NAMES:
        if isinstance(name, str) and name.lower() == ours.lower():
            raise ValueError(f'optimizer.type must be spelled exactly "{ours}" (DeepSpeed resolves names '
                             f"outside its built-ins case-sensitively), got {name!r}")
    return None


def _translate(name: str, params: Mapping[str, Any], accepted: tuple[str, ...], mode: str) -> dict[str, Any]:
    """Our constructor's keyword arguments for the config's ``optimizer.params`` (DeepSpeed's Adam names)."""
    if "torch_adam" in params:
        raise ValueError(f"optimizer.params.torch_adam chooses between DeepSpeed's own Adam implementations and "
                         f"does not apply to {name}; choose our kernel with \"kernel\": \"torch_fused\", \"npu\" "
                         "or \"reference\"")
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        hint = ""
        if set(unknown) & set(SHARDED_ONLY_KEYS):
            hint = (f" ({', '.join(k for k in unknown if k in SHARDED_ONLY_KEYS)} only apply in sharded mode, "
                    "ZeRO stage 0; at stage 1/2 DeepSpeed shards, communicates and scales the loss itself)")
        raise ValueError(f"unknown key(s) {unknown} in optimizer.params for {name} in {mode} mode{hint}; "
                         f"accepted keys: {list(accepted)}")
    kwargs = dict(params)
    decoupled = name == "ShardedFusedAdamW"
    adamw = kwargs.pop("adam_w_mode", decoupled)
    if not isinstance(adamw, bool):
        raise TypeError(f"optimizer.params.adam_w_mode must be true or false, got {adamw!r}")
    if decoupled and not adamw:
        raise ValueError('ShardedFusedAdamW always decouples weight decay: drop "adam_w_mode": false or use '
                         '"type": "ShardedFusedAdam"')
    kwargs["adamw"] = adamw
    if decoupled:
        kwargs.setdefault("weight_decay", 1e-2)  # torch.optim.AdamW's default, as ShardedFusedAdamW
    if isinstance(kwargs.get("betas"), list):
        kwargs["betas"] = tuple(kwargs["betas"])
    if "reduce_dtype" in kwargs:
        if kwargs["reduce_dtype"] not in _DTYPES:
            raise ValueError(f"optimizer.params.reduce_dtype must be one of {sorted(_DTYPES)}, "
                             f"got {kwargs['reduce_dtype']!r}")
        kwargs["reduce_dtype"] = _DTYPES[kwargs["reduce_dtype"]]
    return kwargs


def _nonempty_groups(params: Any) -> Any:
    # DeepSpeed drops empty param groups from the optimizer after construction
    # (engine._configure_optimizer); drop them first so our buckets keep their group index.
    params = list(params)
    return [g for g in params if not (isinstance(g, dict) and len(g["params"]) == 0)]


class DeepSpeedShardedFusedAdam(ShardedFusedAdam):
    """``ShardedFusedAdam`` built by DeepSpeed from a config: it refuses to step until
    ``wire(engine)`` has run, because an unwired stage-0 engine never clears its gradient
    shards (they would accumulate over every step) and all-reduces every gradient again."""

    wired = False

    def step(self, *args: Any, **kwargs: Any) -> Any:
        if not self.wired:
            raise RuntimeError("DeepSpeed built ShardedFusedAdam for ZeRO stage 0 but the engine was not wired: call "
                               "sharded_fused_adam.integrations.deepspeed.wire(engine) after deepspeed.initialize "
                               "(register() and initialize() from that module make engines built afterwards wire "
                               "themselves). If the config uses ZeRO stage 1/2, pass that config to register() so "
                               "that DeepSpeed gets FusedAdam instead (see docs/deepspeed.md).")
        return super().step(*args, **kwargs)


class ShardedMode:
    """ZeRO stage 0: ``ShardedFusedAdam`` does the data-parallel work (see [Note: two modes])."""

    name = "sharded"
    accepted_keys = COMMON_KEYS + SHARDED_ONLY_KEYS

    # Config keys that only tune the engine's own gradient all-reduce, which this mode switches off.
    _ENGINE_ALLREDUCE_KEYS = {
        "communication_data_type": (None, 'use optimizer.params.reduce_dtype ("float32", "bfloat16", "float16")'),
        "prescale_gradients": (False, "ShardedFusedAdam averages gradients itself"),
        "gradient_predivide_factor": (1.0, "ShardedFusedAdam averages gradients itself"),
        "sparse_gradients": (False, "ShardedFusedAdam needs dense gradients"),
    }

    def check_config(self, config: Mapping[str, Any]) -> None:
        """Reject what would make DeepSpeed bypass the optimizer at stage 0.

        ``"fp16"`` / ``"bf16"`` sections (``true`` or ``"auto"``) are fine: the engine casts
        the model and ``ShardedFusedAdam`` does the rest (see [Note: engine construction]
        in deepspeed_engine.py). ``"auto"`` values elsewhere are left for the framework that
        fills them in (the Trainer) and checked when DeepSpeed builds the optimizer.

        Raises:
            ValueError: an enabled torch_autocast section, an option of the engine's gradient
                all-reduce, or an fp16 section together with ``optimizer.params.loss_scale``.
        """
        fp16 = (config.get("fp16") or {}).get("enabled", False) is True
        if fp16 and "loss_scale" in ((config.get("optimizer") or {}).get("params") or {}):
            raise ValueError('the DeepSpeed config enables "fp16" and sets optimizer.params.loss_scale: the fp16 '
                             "section's loss_scale / initial_scale_power already configure ShardedFusedAdam's loss "
                             "scaler at ZeRO stage 0; drop optimizer.params.loss_scale")
        if (config.get("torch_autocast") or {}).get("enabled", False) is True:
            raise ValueError('the DeepSpeed config enables "torch_autocast" at ZeRO stage 0 (sharded mode), which is '
                             "not supported with ShardedFusedAdam: cast the model yourself (see docs/deepspeed.md) "
                             "or use ZeRO stage 1/2")
        for key, (default, instead) in self._ENGINE_ALLREDUCE_KEYS.items():
            if config.get(key, default) != default:
                raise ValueError(f'"{key}": {config[key]!r} configures the engine\'s gradient all-reduce, which '
                                 f"sharded mode (ZeRO stage 0) switches off: {instead}")

    def amend_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        return copy.deepcopy(dict(config))

    def optimizer_kwargs(self, name: str, config_params: Mapping[str, Any]) -> dict[str, Any]:
        """``ShardedFusedAdam``'s keyword arguments for the config's ``optimizer.params``."""
        return _translate(name, config_params, self.accepted_keys, self.name)

    def build(self, name: str, params: Any, config_params: Mapping[str, Any]) -> ShardedFusedAdam:
        kwargs = self.optimizer_kwargs(name, config_params)
        scaler = pending_loss_scaler()  # the engine's fp16 section, taken over at construction
        if scaler is not None:
            if "loss_scale" in kwargs:
                raise ValueError('the DeepSpeed config enables "fp16" and sets optimizer.params.loss_scale: drop '
                                 "optimizer.params.loss_scale (the fp16 section configures the loss scaler)")
            kwargs["loss_scale"] = scaler
        if getattr(_local, "mpu", None) is not None:  # Megatron-DeepSpeed: the engine's model-parallel layout
            kwargs["mpu"] = _local.mpu
        return DeepSpeedShardedFusedAdam(_nonempty_groups(params), **kwargs)

    def wire(self, engine: Any) -> None:
        """Make a stage-0 engine leave reduction and clipping to ``ShardedFusedAdam``.

        Raises:
            ValueError: the engine's optimizer is not an unwrapped ``ShardedFusedAdam``, or it
                reduces over a different group than the engine's data-parallel group.
        """
        opt = engine.optimizer
        if not isinstance(opt, ShardedFusedAdam):
            if isinstance(getattr(engine, "basic_optimizer", None), ShardedFusedAdam):
                raise ValueError(f"DeepSpeed wrapped ShardedFusedAdam in {type(opt).__name__} (an fp16/bf16 section "
                                 "in the config?); at ZeRO stage 0 it must run unwrapped: see docs/deepspeed.md")
            raise ValueError(f"the engine runs ZeRO stage 0 with {type(opt).__name__}, not ShardedFusedAdam; "
                             'nothing to wire (set "type": "ShardedFusedAdam" in the config\'s optimizer section)')
        if getattr(engine, _WIRED, False):
            return
        self._check_group(opt, engine)
        engine.enable_backward_allreduce = False
        self._move_clipping(opt, engine)
        self._extend_engine_methods(opt, engine)
        if isinstance(opt, DeepSpeedShardedFusedAdam):
            opt.wired = True
        setattr(engine, _WIRED, True)

    @staticmethod
    def _check_group(opt: ShardedFusedAdam, engine: Any) -> None:
        theirs = engine.seq_data_parallel_group
        if theirs is None or opt.process_group is None:
            return
        ours_ranks = dist.get_process_group_ranks(opt.process_group)
        their_ranks = dist.get_process_group_ranks(theirs)
        if ours_ranks != their_ranks:
            raise ValueError(f"ShardedFusedAdam reduces over ranks {ours_ranks} but the engine's data-parallel group "
                             f"is {their_ranks}: build ShardedFusedAdam(process_group=...) with the data-parallel "
                             "group and pass it to initialize(optimizer=...)")

    @staticmethod
    def _move_clipping(opt: ShardedFusedAdam, engine: Any) -> None:
        clip = float(engine.gradient_clipping() or 0.0)
        if clip <= 0:
            return
        if opt.max_grad_norm not in (None, clip):
            raise ValueError(f"gradient_clipping is {clip} in the DeepSpeed config but ShardedFusedAdam was built "
                             f"with max_grad_norm={opt.max_grad_norm}: set one of them")
        opt.max_grad_norm = clip
        # Module grads are empty after backward (the optimizer holds them); the engine's
        # _take_model_step would otherwise clip those instead of the real ones.
        engine._config.gradient_clipping = 0.0
        logger.info("gradient_clipping=%s moved from the DeepSpeed engine into ShardedFusedAdam(max_grad_norm=%s)",
                    clip, clip)

    @staticmethod
    def _extend_engine_methods(opt: ShardedFusedAdam, engine: Any) -> None:
        engine_zero_grad, engine_backward, engine_no_sync = engine.zero_grad, engine.backward, engine.no_sync

        def zero_grad(*args: Any, **kwargs: Any) -> None:
            engine_zero_grad(*args, **kwargs)
            opt.zero_grad(set_to_none=True)

        def backward(loss: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            scale = opt.loss_scale  # ShardedFusedAdam(loss_scale=...) is removed again inside step()
            if scale == 1.0:
                return engine_backward(loss, *args, **kwargs)
            return engine_backward(loss * scale, *args, **kwargs) / scale

        @contextlib.contextmanager
        def no_sync() -> Iterator[None]:
            with engine_no_sync(), opt.no_sync():
                yield

        engine.zero_grad, engine.backward, engine.no_sync = zero_grad, backward, no_sync


class DelegatedMode:
    """ZeRO stage 1/2: DeepSpeed does the data-parallel work and steps ``FusedAdam`` locally."""

    name = "delegated"
    accepted_keys = COMMON_KEYS

    def check_config(self, config: Mapping[str, Any]) -> None:
        """Nothing beyond the params: DeepSpeed's own precision and clipping apply here."""

    def amend_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """A copy with ``zero_allow_untested_optimizer`` set, which DeepSpeed requires for any
        optimizer outside its own list at stage 1/2."""
        amended = copy.deepcopy(dict(config))
        if amended.get("zero_allow_untested_optimizer") is not True:
            amended["zero_allow_untested_optimizer"] = True
            logger.info('set "zero_allow_untested_optimizer": true in the DeepSpeed config (ZeRO stage %d runs '
                        "FusedAdam on DeepSpeed's partitions)", zero_stage(config))
        return amended

    def optimizer_kwargs(self, name: str, config_params: Mapping[str, Any]) -> dict[str, Any]:
        """``FusedAdam``'s keyword arguments for the config's ``optimizer.params``."""
        return _translate(name, config_params, self.accepted_keys, self.name)

    def build(self, name: str, params: Any, config_params: Mapping[str, Any]) -> FusedAdam:
        return FusedAdam(params, **self.optimizer_kwargs(name, config_params))

    def wire(self, engine: Any) -> None:
        """Check the engine steps ``FusedAdam``; nothing else to do (see [Note: two modes]).

        Raises:
            ValueError: DeepSpeed wraps a ``ShardedFusedAdam`` (built for stage 0) or another optimizer.
        """
        basic = getattr(engine, "basic_optimizer", None)
        if isinstance(basic, ShardedFusedAdam):
            raise ValueError(f"the engine runs ZeRO stage {engine.zero_optimization_stage()} around a "
                             "ShardedFusedAdam, which only works at stage 0: call register(config) with this "
                             "config (or use initialize()), which builds FusedAdam for stages 1/2")
        if not isinstance(basic, FusedAdam):
            raise ValueError(f"the engine runs ZeRO stage {engine.zero_optimization_stage()} with "
                             f"{type(basic).__name__}, not FusedAdam; nothing to wire")


_MODES = {0: ShardedMode(), 1: DelegatedMode(), 2: DelegatedMode()}


def _mode_for_stage(stage: int) -> ShardedMode | DelegatedMode:
    if stage not in _MODES:
        raise ValueError(f"zero_optimization.stage {stage} is not supported with ShardedFusedAdam: use stage 0 "
                         "(ShardedFusedAdam shards itself) or stage 1/2 (DeepSpeed shards and steps FusedAdam); "
                         "stage 3 also partitions the parameters and is not supported")
    return _MODES[stage]


def mode_for_config(config: Mapping[str, Any]) -> ShardedMode | DelegatedMode:
    """The mode a DeepSpeed config selects through its ZeRO stage.

    Raises:
        ValueError: an unsupported stage (3) or a malformed stage.
    """
    return _mode_for_stage(zero_stage(config))


def mode_for_engine(engine: Any) -> ShardedMode | DelegatedMode:
    """The mode of a built engine, from its ZeRO stage."""
    return _mode_for_stage(int(engine.zero_optimization_stage()))

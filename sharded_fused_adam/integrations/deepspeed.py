"""``"type": "ShardedFusedAdam"`` in a DeepSpeed config: registration, ``initialize`` and engine wiring.

The only module of the package that imports ``deepspeed`` (lazily, inside functions).

Two ways in (see ``docs/deepspeed.md``)::

    from sharded_fused_adam.integrations import deepspeed as sfa_ds
    engine, optimizer, loader, scheduler = sfa_ds.initialize(model=model, model_parameters=..., config=cfg)

or, where a framework calls ``deepspeed.initialize`` itself::

    cfg = sfa_ds.register(cfg)      # before the framework builds the engine
    ...                             # the framework calls deepspeed.initialize(config=cfg); a
                                    # stage-0 engine wires itself (see deepspeed_engine.py)

[Note: mode selection]
DeepSpeed builds an unknown optimizer type as ``getattr(torch.optim, type)(params, **params)``
and passes nothing else, so the callable registered there cannot see the ZeRO stage. The
stage is fixed when registering instead: ``register(config)`` reads it from the same config
that will reach DeepSpeed and binds the name to that mode's builder (``ShardedFusedAdam`` at
stage 0, ``FusedAdam`` at stages 1/2). ``initialize`` does this for its own config; ``wire``
re-derives the mode from the built engine and raises if the two disagree.
"""
from __future__ import annotations

import copy
import os
from typing import Any, Callable, Mapping, Optional, Union

import torch

from ..local_adam import FusedAdam
from ..optimizer import ShardedFusedAdam
from . import deepspeed_engine
from .deepspeed_modes import (OPTIMIZER_NAMES, DelegatedMode, ShardedMode, mode_for_config, mode_for_engine,
                              optimizer_type, zero_stage)

__all__ = ["initialize", "register", "wire", "OPTIMIZER_NAMES", "RegisteredOptimizer"]

Config = Union[str, os.PathLike, Mapping[str, Any]]


class RegisteredOptimizer:
    """What ``torch.optim.ShardedFusedAdam`` (and ``...AdamW``) is after ``register``: builds
    the optimizer of one mode from DeepSpeed's ``(params, **config_params)`` call."""

    def __init__(self, name: str, mode: Union[ShardedMode, DelegatedMode]):
        self.name = name
        self.mode = mode

    def __call__(self, params: Any, **config_params: Any) -> Union[ShardedFusedAdam, FusedAdam]:
        return self.mode.build(self.name, params, config_params)

    def __repr__(self) -> str:
        return f"RegisteredOptimizer({self.name!r}, mode={self.mode.name!r})"


def _load_config(config: Config) -> dict[str, Any]:
    """A config dict from a dict, a JSON/HJSON path or base64, read as DeepSpeed reads it."""
    if isinstance(config, Mapping):
        return copy.deepcopy(dict(config))
    from deepspeed.runtime.tensor_parallel.init_utils import load_ds_config

    return load_ds_config(os.fspath(config))


def _check_names_free() -> None:
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    for name in OPTIMIZER_NAMES:
        # DeepSpeed lower-cases a type that matches one of its built-ins (runtime/config.py).
        if name.lower() in DEEPSPEED_OPTIMIZERS:
            raise RuntimeError(f"DeepSpeed now has a built-in optimizer called {name.lower()!r}; "
                               f"\"type\": \"{name}\" would no longer reach sharded_fused_adam")
        current = getattr(torch.optim, name, None)
        if current is not None and not isinstance(current, RegisteredOptimizer):
            raise RuntimeError(f"torch.optim.{name} is already {current!r}; refusing to replace it")


def register(config: Config) -> dict[str, Any]:
    """Make ``"type": "ShardedFusedAdam"`` / ``"ShardedFusedAdamW"`` work in ``deepspeed.initialize``.

    Binds both names in ``torch.optim`` to the builder of the mode that ``config``'s ZeRO
    stage selects (see [Note: mode selection]); a later call rebinds them. It also makes
    stage-0 engines built from then on take over fp16/bf16 and wire themselves (see
    [Note: engine construction] in ``deepspeed_engine.py``), so nothing else is needed
    when a framework builds the engine.

    Args:
        config: the DeepSpeed config that will be given to ``deepspeed.initialize``: a dict,
            or a path to a JSON file.

    Returns:
        A copy of the config to pass on to DeepSpeed: at stages 1/2 it has
        ``"zero_allow_untested_optimizer": true``, which DeepSpeed requires.

    Raises:
        ValueError: the config does not name our optimizer, uses ZeRO stage 3, has an
            unknown key in ``optimizer.params`` or a setting the mode cannot honour (e.g.
            ``torch_autocast`` at stage 0). ``"auto"`` values are accepted (the Trainer fills
            them in before DeepSpeed reads the config).
    """
    config = _load_config(config)
    name = optimizer_type(config)
    if name is None:
        raise ValueError(f"the config's optimizer.type is {(config.get('optimizer') or {}).get('type')!r}; "
                         f"register() is for configs with \"type\": one of {list(OPTIMIZER_NAMES)}")
    mode = mode_for_config(config)
    mode.check_config(config)
    mode.optimizer_kwargs(name, (config["optimizer"].get("params") or {}))  # a bad key fails here, not in the engine
    _check_names_free()
    deepspeed_engine.install()
    for registered in OPTIMIZER_NAMES:
        setattr(torch.optim, registered, RegisteredOptimizer(registered, mode))
    return mode.amend_config(config)


def wire(engine: Any) -> Any:
    """Finish connecting a built engine to our optimizer; idempotent.

    Engines built after :func:`register` (or by :func:`initialize`) are wired already; this
    is for engines built around a client ``ShardedFusedAdam`` some other way.

    At ZeRO stage 0 (sharded mode) this switches off the engine's gradient all-reduce
    (``enable_backward_allreduce = False``), moves ``gradient_clipping`` into the optimizer's
    ``max_grad_norm``, and makes ``engine.zero_grad()`` clear the optimizer's gradient shards,
    ``engine.backward(loss)`` apply the optimizer's ``loss_scale`` and ``engine.no_sync()``
    also pause the optimizer's reductions. At stages 1/2 it only checks that DeepSpeed steps
    ``FusedAdam``.

    Args:
        engine: the ``DeepSpeedEngine`` returned by ``deepspeed.initialize``.

    Returns:
        The engine.

    Raises:
        ValueError: the engine's optimizer does not match its ZeRO stage (e.g. registered
            for stage 0, built at stage 2), or DeepSpeed wrapped ``ShardedFusedAdam``.
    """
    mode_for_engine(engine).wire(engine)
    return engine


def initialize(
    args: Any = None,
    model: Optional[torch.nn.Module] = None,
    optimizer: Any = None,
    model_parameters: Any = None,
    training_data: Any = None,
    lr_scheduler: Any = None,
    distributed_port: int = 29500,  # deepspeed.constants.TORCH_DISTRIBUTED_DEFAULT_PORT
    mpu: Any = None,
    dist_init_required: Optional[bool] = None,
    collate_fn: Optional[Callable] = None,
    config: Optional[Config] = None,
    mesh_param: Any = None,
    config_params: Optional[Config] = None,
) -> tuple:
    """``deepspeed.initialize`` with ``"type": "ShardedFusedAdam"`` support: same arguments, same result.

    Reads the config (``config``, else ``config_params``, else ``args.deepspeed_config``, as
    DeepSpeed does), validates it and registers the mode it selects, calls
    ``deepspeed.initialize`` with the amended config and wires the engine (:func:`wire`).
    A config that does not name our optimizer is passed through unchanged, and an engine
    around a client ``ShardedFusedAdam`` is wired too.

    Returns:
        ``(engine, engine.optimizer, training_dataloader, lr_scheduler)``, as DeepSpeed.

    Raises:
        ValueError: see :func:`register`; or a client ``ShardedFusedAdam`` at ZeRO stage 1/2.
    """
    import deepspeed

    if config is None:
        config = config_params
    if config is None and getattr(args, "deepspeed_config", None) is not None:
        config = args.deepspeed_config
        args = copy.copy(args)  # DeepSpeed refuses a config given twice; leave the caller's args alone
        args.deepspeed_config = None
    if config is None:
        raise ValueError("initialize needs a DeepSpeed config: pass config=... (a dict or a JSON path) "
                         "or args with deepspeed_config")
    config = _load_config(config)
    named = optimizer_type(config) is not None
    if named:
        config = register(config)
    elif isinstance(optimizer, (ShardedFusedAdam, FusedAdam)):
        config = _prepare_for_client_optimizer(config, optimizer)
    engine, engine_optimizer, loader, scheduler = deepspeed.initialize(
        args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
        training_data=training_data, lr_scheduler=lr_scheduler, distributed_port=distributed_port, mpu=mpu,
        dist_init_required=dist_init_required, collate_fn=collate_fn, config=config, mesh_param=mesh_param)
    if named or isinstance(engine.basic_optimizer, ShardedFusedAdam):
        wire(engine)
    return engine, engine_optimizer, loader, scheduler


def _prepare_for_client_optimizer(config: dict[str, Any], optimizer: Union[ShardedFusedAdam, FusedAdam]) -> dict:
    mode = mode_for_config(config)
    if isinstance(optimizer, ShardedFusedAdam) and not isinstance(mode, ShardedMode):
        raise ValueError(f"a ShardedFusedAdam passed as optimizer=... only works at ZeRO stage 0, the config asks "
                         f"for stage {zero_stage(config)}: pass FusedAdam or use \"type\": \"ShardedFusedAdam\"")
    if isinstance(optimizer, ShardedFusedAdam) or isinstance(mode, DelegatedMode):
        deepspeed_engine.install()
        mode.check_config(config)
        return mode.amend_config(config)
    return config  # FusedAdam at stage 0: a local Adam under DeepSpeed's own all-reduce

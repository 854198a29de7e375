"""``transformers.Trainer`` with ``ShardedFusedAdam``: a Trainer that needs no glue, and a callback.

The only module of the package that imports ``transformers`` (at import time: import this
module only where the Trainer is used). What the stock Trainer (read in transformers 5.25)
does that a sharded optimizer has to answer:

* it builds the optimizer in ``create_optimizer`` (after the process group and the device
  exist) from ``TrainingArguments``, with two param groups (decay / no decay);
* Accelerate wraps the model in DDP when there are several processes, so gradients arrive
  averaged already: the optimizer must not reduce them again;
* it clips with ``accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)`` and logs
  the norm that returns (``Trainer._clip_grad_norm`` / ``_get_grad_norm``): with the
  gradients inside the optimizer that norm must come from the optimizer;
* it saves ``optimizer.state_dict()`` on the saving rank only (``_save_optimizer_and_scheduler``):
  on gloo the other ranks serve their shards (checkpoint/served.py), on NCCL/HCCL it must be
  gathered on every rank first; every rank loads the file on resume (at any world size);
* with a DeepSpeed config the engine builds the optimizer from the config (see
  ``integrations/deepspeed.py``; ``register`` is all it needs).

:class:`Trainer` answers all of these. A Trainer you keep yourself with
``optimizers=(ShardedFusedAdamW(...), None)`` needs nothing on gloo; on NCCL/HCCL add
:class:`ShardedFusedAdamCallback`, which gathers the state on every rank before each save
(``snapshot_state_dict``).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

import torch
import transformers

from ..optimizer import ShardedFusedAdam, ShardedFusedAdamW

__all__ = ["Trainer", "ShardedFusedAdamCallback", "sharded_optimizer", "repair_cpu_deepspeed_args"]

logger = logging.getLogger(__name__)

# TrainingArguments.optim values that mean torch's Adam/AdamW, which ShardedFusedAdamW replaces.
_ADAMW_NAMES = ("adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw_apex_fused", "adamw_torch_npu_fused")


def sharded_optimizer(optimizer: Any) -> Optional[ShardedFusedAdam]:
    """The ``ShardedFusedAdam`` inside ``optimizer`` (Accelerate wraps it), or None."""
    while optimizer is not None and not isinstance(optimizer, ShardedFusedAdam):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


class ShardedFusedAdamCallback(transformers.TrainerCallback):
    """What a stock Trainer needs around a ``ShardedFusedAdam``: ``trainer.add_callback(ShardedFusedAdamCallback())``.

    * The Trainer calls ``optimizer.state_dict()`` on the saving rank only; a sharded state is
      spread over all ranks. When ``control.should_save`` is set (after ``DefaultFlowCallback``
      decided, before the save) every rank calls ``snapshot_state_dict()``, so the saving
      rank's ``state_dict()`` returns the gathered state without communicating.

    Args:
        snapshot: gather before saves (our :class:`Trainer` saves the optimizer itself and
            passes False).
    """

    def __init__(self, snapshot: bool = True):
        self.snapshot = snapshot

    def _snapshot(self, control: Any, optimizer: Any) -> None:
        opt = sharded_optimizer(optimizer)
        if self.snapshot and control.should_save and opt is not None:
            opt.snapshot_state_dict()

    def on_step_end(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        self._snapshot(control, optimizer)

    def on_epoch_end(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        self._snapshot(control, optimizer)


class Trainer(transformers.Trainer):
    """``transformers.Trainer`` that trains with ``ShardedFusedAdamW``; same arguments.

    Without a DeepSpeed config it builds ``ShardedFusedAdamW`` from the ``TrainingArguments``
    (``learning_rate``, ``adam_beta1/2``, ``adam_epsilon``, ``weight_decay`` on the Trainer's
    decay group), unless ``optimizers=(ShardedFusedAdam(...), ...)`` hands it one. Several
    processes: Accelerate's DDP averages the gradients and the optimizer keeps only its shard
    (no second reduction). ``max_grad_norm`` clips, and the logged ``grad_norm`` is read,
    inside the optimizer (the global norm of the averaged gradients). Checkpoints gather the
    optimizer state on every rank and load at any world size.

    With a DeepSpeed config (``TrainingArguments(deepspeed=...)``) that names
    ``"ShardedFusedAdam"``/``"ShardedFusedAdamW"`` it registers that config (see
    :func:`sharded_fused_adam.integrations.deepspeed.register`); everything else is DeepSpeed's.

    Raises:
        ValueError: ``args.optim`` names an optimizer other than Adam/AdamW.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        hf_ds_config = getattr(training_args, "hf_deepspeed_config", None)
        if hf_ds_config is not None:
            repair_cpu_deepspeed_args(training_args)
            _register_deepspeed_config(training_args.hf_deepspeed_config.config)
        elif training_args is not None and str(getattr(training_args.optim, "value", training_args.optim)) \
                not in _ADAMW_NAMES and kwargs.get("optimizers", (None, None))[0] is None:
            raise ValueError(f"TrainingArguments.optim is {training_args.optim!r}; sharded_fused_adam's Trainer trains "
                             f"with ShardedFusedAdamW in place of one of {list(_ADAMW_NAMES)}")
        super().__init__(*args, **kwargs)
        if not self.is_deepspeed_enabled:
            self.add_callback(ShardedFusedAdamCallback(snapshot=False))

    def create_optimizer(self, model: Optional[torch.nn.Module] = None) -> torch.optim.Optimizer:
        """Build ``ShardedFusedAdamW`` with the Trainer's param groups (see the class docstring)."""
        if self.optimizer is not None or self.is_deepspeed_enabled or self.optimizer_cls_and_kwargs is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
                  {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
        self.optimizer = ShardedFusedAdamW(
            [g for g in groups if g["params"]], lr=self.args.learning_rate,
            betas=(self.args.adam_beta1, self.args.adam_beta2), eps=self.args.adam_epsilon,
            reduce_gradients=False)
        self._grads_in_params = True
        return self.optimizer

    def _sharded(self) -> Optional[ShardedFusedAdam]:
        """The optimizer to clip and save through (None: the Trainer's own code is exact)."""
        if self.is_deepspeed_enabled or getattr(self, "_grads_in_params", False):
            return None  # DeepSpeed's engine, or param.grad holds the averaged gradient until step()
        return sharded_optimizer(self.optimizer)

    def _sharded_state_owner(self) -> Optional[ShardedFusedAdam]:
        return None if self.is_deepspeed_enabled else sharded_optimizer(self.optimizer)

    def _clip_grad_norm(self, model: torch.nn.Module) -> Any:
        opt = self._sharded()
        if opt is None:
            return super()._clip_grad_norm(model)
        return opt.clip_grad_norm_(self.args.max_grad_norm)

    def _get_grad_norm(self, model: torch.nn.Module, grad_norm: Any = None) -> Any:
        opt = self._sharded()
        if opt is not None and grad_norm is None:
            grad_norm = opt.clip_grad_norm_(float("inf"))  # the norm only: an infinite bound never clips
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        opt = self._sharded_state_owner()
        if opt is None:
            return super()._save_optimizer_and_scheduler(output_dir)
        state = opt.state_dict()  # a collective: every rank is here
        if self.args.should_save:
            torch.save(state, os.path.join(output_dir, transformers.trainer.OPTIMIZER_NAME))
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, transformers.trainer.SCHEDULER_NAME))


def repair_cpu_deepspeed_args(args: transformers.TrainingArguments) -> bool:
    """``TrainingArguments(deepspeed=...)`` on a CPU machine: the real world size, and "auto" filled for it.

    See :func:`sharded_fused_adam.integrations.accelerate.repair_cpu_deepspeed_state`: Accelerate
    records one process, and ``TrainingArguments`` fills the config's "auto" batch sizes for
    it. After repairing the process state this fills them again from ``args.deepspeed`` (the
    Trainer keeps that original). A no-op on machines with accelerators and without DeepSpeed.

    Returns:
        Whether anything was repaired.
    """
    from accelerate.utils import DeepSpeedPlugin
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    from .accelerate import repair_cpu_deepspeed_state

    if not args.deepspeed:
        return False
    _ = args.device  # sets up Accelerate's process state
    if not repair_cpu_deepspeed_state():
        return False
    args.hf_deepspeed_config = HfTrainerDeepSpeedConfig(args.deepspeed)
    args.hf_deepspeed_config.trainer_config_process(args)
    args.deepspeed_plugin = DeepSpeedPlugin(hf_ds_config=args.hf_deepspeed_config)
    return True


def _register_deepspeed_config(config: dict) -> None:
    """Register a Trainer's DeepSpeed config in place if it names our optimizer."""
    from . import deepspeed as sfa_ds
    from .deepspeed_modes import optimizer_type

    if optimizer_type(config) is None:
        return
    amended = sfa_ds.register(config)
    config.clear()
    config.update(amended)  # the Trainer and Accelerate hold this very dict

"""Accelerate loops with ``ShardedFusedAdam``: an optimizer built for what ``accelerator.prepare`` does.

The only module of the package that imports ``accelerate`` (lazily). What ``prepare`` does,
read in accelerate 1.16 (``Accelerator.prepare_model`` / ``prepare_optimizer``):

* the model is moved to ``accelerator.device``, which is ``cpu:0`` on CPU machines (a copy of
  every param: the optimizer points them back at its buffers, see [Note: params are views]
  in flat_buffer.py) and, with several processes, wrapped in DDP, which averages the
  gradients itself (``no_sync()`` under ``accelerator.accumulate``);
* the optimizer is wrapped in ``AcceleratedOptimizer``, which steps and zeroes only when
  ``accelerator.sync_gradients`` and round-trips ``state_dict()`` once on every rank;
* ``accelerator.clip_grad_norm_`` calls ``torch.nn.utils.clip_grad_norm_`` on ``param.grad``;
  ``save_state`` calls ``optimizer.state_dict()`` on every rank and writes rank 0's.

:func:`make_optimizer` builds the optimizer so that each of these gives torch's result: the
gradients DDP averaged (or, with one process, the local ones) stay in ``param.grad`` until
``step()``, which takes this rank's shard of them without a second reduction.
"""
from __future__ import annotations

import os
from typing import Any, Iterable

from ..optimizer import ShardedFusedAdam, ShardedFusedAdamW

__all__ = ["make_optimizer", "repair_cpu_deepspeed_state"]

_PLAIN_TYPES = ("NO", "MULTI_CPU", "MULTI_GPU", "MULTI_NPU", "MULTI_XPU", "MULTI_MLU", "MULTI_MUSA", "MULTI_HPU",
                "MULTI_SDAA")


def make_optimizer(accelerator: Any, params: Iterable[Any], *, adamw: bool = True, **kwargs: Any) -> ShardedFusedAdam:
    """``ShardedFusedAdamW`` (or ``ShardedFusedAdam`` with ``adamw=False``) for ``accelerator.prepare``.

    Call it after ``Accelerator()`` (which creates the process group) and before ``prepare``.

    Args:
        accelerator: the ``accelerate.Accelerator`` that will prepare the model.
        params: the model's params or param groups.
        adamw: decoupled weight decay (``torch.optim.AdamW``).
        **kwargs: any other ``ShardedFusedAdam`` argument (``lr``, ``weight_decay``, ...).

    Raises:
        ValueError: the accelerator runs DeepSpeed or FSDP, which shard on their own (for
            DeepSpeed name the optimizer in its config, see ``integrations.deepspeed``), or
            ``reduce_gradients`` is passed.
    """
    kind = str(accelerator.distributed_type).split(".")[-1]
    if kind not in _PLAIN_TYPES:
        raise ValueError(f"accelerator.distributed_type is {kind}; make_optimizer is for data-parallel (DDP) or "
                         "single-process Accelerate loops. Under DeepSpeed name the optimizer in the config "
                         '("type": "ShardedFusedAdamW", see docs/integrations.md)')
    if "reduce_gradients" in kwargs:
        raise ValueError("make_optimizer sets reduce_gradients itself (DDP averages the gradients)")
    cls = ShardedFusedAdamW if adamw else ShardedFusedAdam
    # DDP (several processes) averages into param.grad; with one process param.grad is final.
    return cls(params, reduce_gradients=False, **kwargs)


def repair_cpu_deepspeed_state() -> bool:
    """Give Accelerate's process state the real world size under DeepSpeed on a CPU machine.

    Accelerate 1.16 picks no backend on a machine without accelerators unless told ``cpu=True``
    (``PartialState._prepare_backend``), and under DeepSpeed (which ``cpu=True`` switches off)
    it then records one process although DeepSpeed's ``init_distributed`` created a group of
    all of them: every rank trains on the whole data set and DeepSpeed's batch-size check
    fails (``train_batch_size`` "auto" is filled in for one process). Call it after the
    ``TrainingArguments`` exist (``sharded_fused_adam.integrations.transformers.Trainer``
    does); a no-op everywhere else.

    Returns:
        Whether anything was repaired.
    """
    import torch.distributed as dist
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = PartialState._shared_state
    if (not state or state.get("distributed_type") != DistributedType.DEEPSPEED or state.get("backend") is not None
            or not dist.is_initialized() or dist.get_world_size() == state.get("num_processes")):
        return False
    state.update(backend=dist.get_backend(), num_processes=dist.get_world_size(), process_index=dist.get_rank(),
                 local_process_index=int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return True

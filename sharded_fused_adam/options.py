"""``ShardingOptions``: how ShardedFusedAdam shards, communicates and checks, validated once.

Every keyword argument of ``ShardedFusedAdam`` after the Adam hyperparameters is a field
here, so the constructor, the DeepSpeed config's ``params`` and the docs share one list.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
import torch.distributed as dist

from .comm.plans import COMM_PLANS
from .core.compact_state import MASTER_WEIGHTS
from .core.storage import OFFLOADS
from .kernels import KERNEL_NAMES
from .numerics.precision import LossScaler, make_loss_scaler

__all__ = ["ShardingOptions", "GRADIENT_MODES"]

GRADIENT_MODES = ("sharded", "replicated")
_REDUCE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_STATE_DTYPES = (None, torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class ShardingOptions:
    """The keyword-only options of ``ShardedFusedAdam``.

    Attributes:
        process_group: the data-parallel group; default: the world group if
            torch.distributed is initialized, else a single rank.
        mpu: Megatron's ``parallel_state`` (or any object with its functions, the ``mpu``
            ``deepspeed.initialize`` takes): shard over its data-parallel group and agree on
            the gradient norm, overflow and loss scale with its model-parallel group
            (docs/parallelism.md).
        device_mesh: a torch ``DeviceMesh``: 1-D, its group shards; 2-D with
            ``mesh_dim_names=("replicate", "shard")``, hybrid sharding (shard within
            "shard", replicate across "replicate").
        grads: ``"sharded"`` (ZeRO-2, default: after backward the averaged gradients live in
            the optimizer and ``param.grad`` is None) or ``"replicated"`` (ZeRO-1: the averaged
            gradient stays in ``param.grad``, so every torch idiom that reads it works).
        kernel: ``"torch_fused"`` (default), ``"npu"`` or ``"reference"``.
        bucket_cap_mb: soft size limit of one bucket of params, in MiB.
        overlap: start each bucket's reduction during backward as soon as it is complete.
        reduce_dtype: dtype in which fp16/bf16 gradients are summed across ranks (fp32 by
            default: a bf16 sum loses bits at every hop; pass the param dtype to halve traffic).
        comm: ``"auto"``, ``"scatter_gather"``, ``"allreduce_broadcast"`` or ``"send_recv"``
            (see comm.py).
        max_grad_norm: clip the global 2-norm of the averaged gradients inside ``step()``.
        loss_scale: ``None``, a static scale, ``"dynamic"`` or a ``LossScaler``; applied by
            ``backward(loss)`` and removed inside ``step()``.
        collective_timeout: seconds any collective may wait before a ``CollectiveError``
            names the ranks that never joined (None: the process group's timeout).
        reduce_gradients: None (default): find out at the first backward whether a DDP
            wrapper already averages the gradients; True: always reduce; False: never.
        broadcast_params: copy rank 0's params to every rank at construction, as DDP does.
        state_dict_timeout: seconds ``state_dict()`` waits for every rank to call it before
            raising (it is a collective; see ``snapshot_state_dict``).
        overlap_param_gather: ``step()`` returns with the param gathers in flight and the first
            read of each bucket's params waits for that bucket (param_gather.py); a failed
            gather then raises its ``CollectiveError`` there. Off by default: on gloo with 2
            ranks on 2 cores it measured slower (docs/benchmarks.md).
        master_weights: how fp32 masters of bf16 params are held: ``"fp32"`` (a 4-byte copy),
            ``"split"`` (the bf16 param plus a 2-byte residual, bit for bit the same master and
            the same training; slower on CPU) or ``"auto"`` (default: ``"fp32"``). fp16 params
            always keep 4-byte masters (see docs/mixed-precision.md).
        state_dtype: the dtype Adam's moments are stored in: None (default: fp32, or the
            params' dtype for fp64) or ``torch.bfloat16`` (half the moment memory; the update
            still runs in fp32; measured quality in docs/mixed-precision.md).
        offload: None (default) or ``"host"``: moments and fp32 masters live in host memory
            (pinned on an accelerator) and stream through the device in chunks for the update,
            bit for bit the same training (docs/mixed-precision.md). Not with
            ``master_weights="split"``.

    Raises:
        ValueError: a value out of range or not one of the listed choices.
        TypeError: a value of the wrong type.
    """

    process_group: Optional[dist.ProcessGroup] = None
    mpu: Any = None
    device_mesh: Any = None
    grads: str = "sharded"
    kernel: Optional[str] = None
    bucket_cap_mb: float = 25.0
    overlap: bool = True
    reduce_dtype: torch.dtype = torch.float32
    comm: str = "auto"
    max_grad_norm: Optional[float] = None
    loss_scale: Union[None, float, str, LossScaler] = None
    collective_timeout: Optional[float] = None
    reduce_gradients: Optional[bool] = None
    broadcast_params: bool = True
    state_dict_timeout: float = 60.0
    overlap_param_gather: bool = False
    master_weights: str = "auto"
    state_dtype: Optional[torch.dtype] = None
    offload: Optional[str] = None

    def __post_init__(self) -> None:
        if self.grads not in GRADIENT_MODES:
            raise ValueError(f"grads must be one of {GRADIENT_MODES}, got {self.grads!r}")
        if self.kernel is not None and self.kernel not in KERNEL_NAMES:
            raise ValueError(f"kernel must be one of {KERNEL_NAMES} or None, got {self.kernel!r}")
        if self.comm not in COMM_PLANS:
            raise ValueError(f"comm must be one of {COMM_PLANS}, got {self.comm!r}")
        if not self.bucket_cap_mb > 0:
            raise ValueError(f"bucket_cap_mb must be > 0, got {self.bucket_cap_mb}")
        if self.collective_timeout is not None and not self.collective_timeout > 0:
            raise ValueError(f"collective_timeout must be > 0 seconds or None, got {self.collective_timeout}")
        if not self.state_dict_timeout > 0:
            raise ValueError(f"state_dict_timeout must be > 0 seconds, got {self.state_dict_timeout}")
        if self.reduce_dtype not in _REDUCE_DTYPES:
            raise ValueError(f"reduce_dtype must be torch.float32, bfloat16 or float16, got {self.reduce_dtype}")
        if self.master_weights not in MASTER_WEIGHTS:
            raise ValueError(f"master_weights must be one of {MASTER_WEIGHTS}, got {self.master_weights!r}")
        if self.state_dtype not in _STATE_DTYPES:
            raise ValueError(f"state_dtype must be None, torch.float32 or torch.bfloat16, got {self.state_dtype!r}")
        if self.offload not in OFFLOADS:
            raise ValueError(f"offload must be one of {OFFLOADS}, got {self.offload!r}")
        if self.offload is not None and self.master_weights == "split":
            raise ValueError(f"offload={self.offload!r} keeps 4-byte fp32 masters in host memory; it cannot be "
                             "combined with master_weights='split' (use master_weights='auto' or 'fp32')")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")
        for name in ("overlap", "broadcast_params", "overlap_param_gather"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.reduce_gradients not in (None, True, False):
            raise TypeError(f"reduce_gradients must be None, True or False, got {self.reduce_gradients!r}")
        make_loss_scaler(self.loss_scale)  # validates

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> "ShardingOptions":
        """Build from keyword arguments; an unknown name is a TypeError naming it and the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"ShardedFusedAdam got unexpected keyword argument(s) {unknown}; "
                            f"its options are {sorted(known)}")
        return cls(**kwargs)

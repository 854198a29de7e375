"""The five training configurations of bench_step.py behind one interface: timed steps and held bytes.

Every configuration runs the same local Adam kernel, ``torch._fused_adam_`` (through
``torch.optim.Adam(fused=True)`` or, for ours, its ``torch_fused`` kernel), so the table compares
how each one shards, communicates and schedules, not four different Adam implementations.
DeepSpeed gets a client ``torch.optim.Adam(fused=True)``, which its ZeRO stages 1/2 accept
(``ZERO_SUPPORTED_OPTIMIZERS``); ``--ds-adam`` switches to its config-built optimizers.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["CONFIGS", "VARIANTS", "LABELS", "DS_ADAM_CHOICES", "Settings", "StepTimes", "HeldBytes", "Trainer", "build"]

CONFIGS = ("ddp_adam", "torch_zero", "ds_zero1", "ds_zero2", "ours")
LABELS = {
    "ddp_adam": "DDP + Adam(fused)",
    "torch_zero": "torch ZeRO + Adam(fused)",
    "ds_zero1": "DeepSpeed ZeRO-1",
    "ds_zero2": "DeepSpeed ZeRO-2",
    "ours": "ShardedFusedAdam",
}
# Variants of ours for A/B runs (``--configs ours,ours_allreduce_broadcast``), not in the default
# list: name -> extra ShardedFusedAdam keyword arguments.
VARIANTS = {
    "ours_overlap_gather": {"overlap_param_gather": True},
    "ours_allreduce_broadcast": {"comm": "allreduce_broadcast"},  # gloo before SendRecv
    "ours_offload": {"offload": "host"},  # on CPU the host is the device: bookkeeping cost only
    "ours_buckets_4mb": {"bucket_cap_mb": 4.0},  # a comm pool of 4 MiB buckets instead of 25
}
LABELS.update({name: "ShardedFusedAdam " + ", ".join(f"{k}={v}" for k, v in kw.items())
               for name, kw in VARIANTS.items()})
DS_ADAM_CHOICES = ("fused", "torch_adam", "deepspeed")


@dataclass(frozen=True)
class Settings:
    """Knobs shared by all configurations (one value each, so the comparison stays like for like).

    ``bucket_mb`` is DDP's ``bucket_cap_mb``, ours' ``bucket_cap_mb`` and (converted to fp32
    elements) DeepSpeed's ``reduce_bucket_size`` and ``allgather_bucket_size``.
    """

    lr: float = 1e-3
    bucket_mb: float = 25.0
    ds_adam: str = "fused"
    ds_overlap_comm: bool = False

    def __post_init__(self) -> None:
        if self.ds_adam not in DS_ADAM_CHOICES:
            raise ValueError(f"ds_adam must be one of {DS_ADAM_CHOICES}, got {self.ds_adam!r}")
        if not self.bucket_mb > 0:
            raise ValueError(f"bucket_mb must be > 0, got {self.bucket_mb}")


@dataclass(frozen=True)
class StepTimes:
    """Wall times of one training iteration, in seconds.

    ``forward``: zero_grad (where the configuration has one outside its step) and the
    forward pass; ``backward``: ``loss.backward()`` / ``engine.backward(loss)``;
    ``step``: ``optimizer.step()`` / ``engine.step()``, whatever each of them does.
    """

    forward: float
    backward: float
    step: float

    @property
    def total(self) -> float:
        return self.forward + self.backward + self.step


@dataclass(frozen=True)
class HeldBytes:
    """Optimizer-held bytes on this rank: fp32 master copies and Adam moments (plus step tensors)."""

    masters: int
    state: int

    @property
    def total(self) -> int:
        return self.masters + self.state


def _tensor_bytes(tensors: Iterable[object]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(_tensor_bytes(s.values()) for s in optimizer.state.values())


class Trainer:
    """One configuration: ``train_step`` runs and times an iteration, ``held_bytes`` reports state.

    Subclasses set ``module`` (the plain ``nn.Module`` whose params are compared) and
    implement the three phases.
    """

    name: str
    module: nn.Module

    def train_step(self, tokens: torch.Tensor, targets: torch.Tensor) -> StepTimes:
        t0 = time.perf_counter()
        loss = self.forward(tokens, targets)
        t1 = time.perf_counter()
        self.backward(loss)
        t2 = time.perf_counter()
        self.step()
        t3 = time.perf_counter()
        return StepTimes(t1 - t0, t2 - t1, t3 - t2)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        raise NotImplementedError

    def held_bytes(self) -> HeldBytes:
        raise NotImplementedError

    def drain(self) -> None:
        """Finish work a step left in flight, so it is not hidden in the next configuration's time."""

    def flat_params(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.module.parameters()])


class _DDPTrainer(Trainer):
    """DDP (25 MiB buckets, grads as bucket views) with an optimizer that steps after backward."""

    def __init__(self, name: str, model: nn.Module, settings: Settings, make_opt: Callable):
        from torch.nn.parallel import DistributedDataParallel as DDP

        self.name = name
        self.module = model
        self.ddp = DDP(model, bucket_cap_mb=settings.bucket_mb, gradient_as_bucket_view=True)
        self.optimizer = make_opt(model)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        return self.ddp(tokens, targets)

    def step(self) -> None:
        self.optimizer.step()


class DDPAdam(_DDPTrainer):
    def __init__(self, model: nn.Module, settings: Settings):
        super().__init__("ddp_adam", model, settings,
                         lambda m: torch.optim.Adam(m.parameters(), lr=settings.lr, fused=True))

    def held_bytes(self) -> HeldBytes:
        return HeldBytes(0, _state_bytes(self.optimizer))


class TorchZeRO(_DDPTrainer):
    def __init__(self, model: nn.Module, settings: Settings):
        from torch.distributed.optim import ZeroRedundancyOptimizer

        super().__init__("torch_zero", model, settings, lambda m: ZeroRedundancyOptimizer(
            m.parameters(), optimizer_class=torch.optim.Adam, lr=settings.lr, fused=True,
            parameters_as_bucket_view=True))

    def held_bytes(self) -> HeldBytes:
        return HeldBytes(0, _state_bytes(self.optimizer.optim))


class DeepSpeedZeRO(Trainer):
    """A DeepSpeed engine at ZeRO stage 1 or 2, fp32, on the process group already set up."""

    def __init__(self, model: nn.Module, settings: Settings, *, stage: int, micro_batch: int):
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        self.name = f"ds_zero{stage}"
        self.module = model
        bucket_numel = int(settings.bucket_mb * 2**20) // 4
        config = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": 1,
            "steps_per_print": 2**30,
            "wall_clock_breakdown": False,
            "gradient_clipping": 0.0,
            "zero_optimization": {
                "stage": stage,
                "reduce_bucket_size": bucket_numel,
                "allgather_bucket_size": bucket_numel,
                "overlap_comm": settings.ds_overlap_comm,
                "contiguous_gradients": True,
            },
        }
        optimizer = None
        if settings.ds_adam == "fused":
            optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr, fused=True)
        else:
            params = {"lr": settings.lr, "torch_adam": settings.ds_adam == "torch_adam"}
            config["optimizer"] = {"type": "Adam", "params": params}
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), optimizer=optimizer, config=config)
        torch.set_num_threads(1)  # keep every configuration on one intra-op thread

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.engine(tokens, targets)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()

    def held_bytes(self) -> HeldBytes:
        zero = self.engine.optimizer
        return HeldBytes(_tensor_bytes(zero.single_partition_of_fp32_groups), _state_bytes(zero.optimizer))


class Ours(Trainer):
    """``ShardedFusedAdam`` on the plain model (no DDP: it averages the gradients itself)."""

    def __init__(self, model: nn.Module, settings: Settings, name: str = "ours"):
        from sharded_fused_adam import ShardedFusedAdam

        self.name = name
        self.module = model
        kwargs = {"bucket_cap_mb": settings.bucket_mb, **VARIANTS.get(name, {})}
        self.optimizer = ShardedFusedAdam(model.parameters(), lr=settings.lr, **kwargs)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        return self.module(tokens, targets)

    def step(self) -> None:
        self.optimizer.step()

    def drain(self) -> None:
        self.optimizer.wait_for_gathers()

    def held_bytes(self) -> HeldBytes:
        report = self.optimizer.memory_report()
        return HeldBytes(report.master_shards, report.moments)


def build(name: str, model: nn.Module, settings: Settings, *, micro_batch: int) -> Trainer:
    """The configuration ``name`` (one of ``CONFIGS``) around ``model``, which it takes over.

    Raises:
        ValueError: ``name`` is not a known configuration.
    """
    if not dist.is_initialized():
        raise RuntimeError("build() needs torch.distributed initialized (run under torchrun)")
    if name == "ddp_adam":
        return DDPAdam(model, settings)
    if name == "torch_zero":
        return TorchZeRO(model, settings)
    if name in ("ds_zero1", "ds_zero2"):
        return DeepSpeedZeRO(model, settings, stage=int(name[-1]), micro_batch=micro_batch)
    if name == "ours" or name in VARIANTS:
        return Ours(model, settings, name)
    raise ValueError(f"configuration must be one of {(*CONFIGS, *VARIANTS)}, got {name!r}")

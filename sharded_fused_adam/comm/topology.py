"""Who shards with whom: the shard group, the replicate group, the averaging divisor and the model-parallel ranks.

[Note: topology]
One ``world_size`` used to answer four questions; under tensor, pipeline and hybrid
parallelism they have different answers, so each has a field of its own:

* ``shard_group``: the ranks a bucket is split over (reduce-scatter, all-gather); its size
  is the number of shards, so each rank holds 1/shard_size of the optimizer state.
* ``replicate_group``: the ranks that hold the same shard (hybrid sharding, FSDP2's HSDP):
  after the reduce-scatter within the shard group, the shard is all-reduced across it.
* the data-parallel size ``shard_size * replicate_size``: what gradients are divided by (it
  is the number of ranks whose gradients are summed; FSDP2 derives its divide factor the
  same way, from the mesh and never from "the" world size).
* ``model_parallel_group``: the ranks with the same data-parallel index that hold other
  parts of the model (tensor- and pipeline-parallel peers). The global facts of a step
  (the gradient norm, the overflow flag and so the loss-scale verdict) are agreed over
  them as well, so every rank clips by the same norm and skips the same steps. A param
  split across tensor-parallel ranks is marked ``tensor_model_parallel = True`` (Megatron)
  or ``model_parallel = True`` (DeepSpeed); every other param is a copy on each
  tensor-parallel rank and is counted in the norm by tensor-parallel rank 0 only. A param
  marked ``shared = True`` (Megatron's copy of the word embeddings on the last pipeline
  stage, tied to the first stage's) is not counted at all: its twin is.

The per-param has-gradient mask is agreed over the data-parallel ranks only: pipeline
stages hold different params, so their masks are not comparable.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

from .plans import CommCounter, CommPlan, choose_comm_plan
from .startup import agree_on_layout, broadcast_params, describe_params

__all__ = ["Topology", "resolve_topology", "build_plan", "agree_at_startup", "is_tensor_parallel", "check_no_dtensor",
           "MESH_DIM_NAMES"]

ProcessGroup = Optional[dist.ProcessGroup]
MESH_DIM_NAMES = ("replicate", "shard")  # FSDP2's HSDP convention for a 2-D mesh
_MPU_DP = "get_data_parallel_group"
_MPU_MP = "get_model_parallel_group"


def _ranks(group: ProcessGroup) -> list[int]:
    """The global ranks of ``group`` (None: the default group)."""
    return dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)


def is_tensor_parallel(p: torch.Tensor) -> bool:
    """Whether ``p`` is split across tensor-parallel ranks (Megatron's or DeepSpeed's attribute)."""
    return bool(getattr(p, "tensor_model_parallel", False) or getattr(p, "model_parallel", False))


@dataclass(frozen=True)
class Topology:
    """The groups of [Note: topology]; None for a group means: none (the default group for ``shard_group``).

    Attributes:
        shard_group: the group buckets are sharded over (None: the default group).
        replicate_group: the group the shards are replicated over (hybrid sharding), or None.
        model_parallel_group: the tensor x pipeline-parallel peers that agree on the step's
            global facts, or None (plain data parallelism).
        tensor_parallel_rank: this rank's tensor-parallel rank (duplicated params count in
            the gradient norm on rank 0 only).
        source: what the topology was built from, for error messages.

    Raises:
        ValueError: a negative tensor-parallel rank, a replicate or model-parallel group that
            shares a rank other than this one with the shard group, or a one-rank replicate group.
    """

    shard_group: ProcessGroup = None
    replicate_group: ProcessGroup = None
    model_parallel_group: ProcessGroup = None
    tensor_parallel_rank: int = 0
    source: str = "process_group"

    def __post_init__(self) -> None:
        if self.tensor_parallel_rank < 0:
            raise ValueError(f"tensor_parallel_rank must be >= 0, got {self.tensor_parallel_rank}")
        if not (dist.is_available() and dist.is_initialized()):
            if self.replicate_group is not None or self.model_parallel_group is not None:
                raise ValueError(f"a {self.source} with replicate or model-parallel groups needs torch.distributed "
                                 "to be initialized")
            return
        me, shard = dist.get_rank(), set(_ranks(self.shard_group))
        for name in ("replicate_group", "model_parallel_group"):
            group = getattr(self, name)
            if group is None:
                continue
            ranks = _ranks(group)
            if set(ranks) & shard != {me}:
                raise ValueError(f"{name} (global ranks {ranks}) must meet the shard group (global ranks "
                                 f"{sorted(shard)}) in this rank ({me}) only; from {self.source}")
        if self.replicate_group is not None and len(_ranks(self.replicate_group)) < 2:
            raise ValueError("replicate_group has one rank: pass None instead (no replication)")

    @property
    def hybrid(self) -> bool:
        """Shards are replicated across a second group."""
        return self.replicate_group is not None

    @property
    def model_parallel(self) -> bool:
        """Global facts are agreed beyond the data-parallel ranks."""
        return self.model_parallel_group is not None

    def counts_in_norm(self, p: torch.Tensor) -> bool:
        """Whether this rank counts ``p`` in the global gradient norm (TP duplicates: rank 0 only;
        Megatron's ``shared`` tied copies: never)."""
        if getattr(p, "shared", False):
            return False
        return self.tensor_parallel_rank == 0 or is_tensor_parallel(p)


def _from_mpu(mpu: Any) -> Topology:
    """Megatron's ``parallel_state`` (or DeepSpeed's ``mpu``): the data-parallel group shards."""
    missing = [name for name in (_MPU_DP, _MPU_MP) if not callable(getattr(mpu, name, None))]
    if missing:
        raise TypeError(f"mpu must provide Megatron's parallel_state functions; {type(mpu).__name__} lacks "
                        f"{missing}")
    get_cp_size = getattr(mpu, "get_context_parallel_world_size", None)
    if callable(get_cp_size) and get_cp_size() > 1:
        # Megatron averages gradients over data x context-parallel ranks; get_data_parallel_group()
        # alone would leave the context-parallel partial gradients unsummed.
        raise ValueError(f"the mpu has context parallelism (size {get_cp_size()}), which ShardedFusedAdam does not "
                         "support yet: gradients would not be summed over the context-parallel ranks")
    get_tp_rank = getattr(mpu, "get_tensor_model_parallel_rank", None) or getattr(mpu, "get_model_parallel_rank", None)
    if not callable(get_tp_rank):
        raise TypeError(f"mpu must provide get_tensor_model_parallel_rank (Megatron) or get_model_parallel_rank "
                        f"(DeepSpeed); {type(mpu).__name__} has neither")
    mp_group = mpu.get_model_parallel_group()
    if mp_group is not None and len(_ranks(mp_group)) == 1:
        mp_group = None  # no model parallelism: plain data parallel
    return Topology(mpu.get_data_parallel_group(), None, mp_group, int(get_tp_rank()), "mpu")


def _from_mesh(mesh: Any) -> Topology:
    """A 1-D mesh: its group shards. A 2-D mesh named ("replicate", "shard"): hybrid sharding."""
    names = tuple(mesh.mesh_dim_names or ())
    if mesh.ndim == 1:
        return Topology(mesh.get_group(0), source="device_mesh")
    if mesh.ndim != 2 or names != MESH_DIM_NAMES:
        raise ValueError(f"device_mesh must be 1-D (data parallel) or 2-D with mesh_dim_names={MESH_DIM_NAMES} "
                         f"(hybrid sharding), got {mesh.ndim}-D with names {names or None}")
    shard, replicate = mesh.get_group("shard"), mesh.get_group("replicate")
    if mesh.size(1) == 1:
        raise ValueError("device_mesh's 'shard' dimension has size 1: nothing is sharded; use a 1-D mesh "
                         "(or torch's DistributedDataParallel) instead")
    return Topology(shard, replicate if mesh.size(0) > 1 else None, source="device_mesh")


def resolve_topology(process_group: ProcessGroup, mpu: Any, device_mesh: Any) -> Topology:
    """The topology the optimizer's options describe (at most one of the three sources, or mpu + mesh).

    With both an ``mpu`` and a ``device_mesh`` the mesh shards and replicates within the
    mpu's data-parallel ranks (it must span exactly them) and the mpu names the
    model-parallel peers.

    Raises:
        ValueError: ``process_group`` together with ``mpu`` or ``device_mesh``, a mesh that
            does not span the mpu's data-parallel ranks, or a malformed mesh.
        TypeError: an ``mpu`` without Megatron's functions.
    """
    if process_group is not None and (mpu is not None or device_mesh is not None):
        raise ValueError("pass process_group, or mpu and/or device_mesh, not both: the mpu's data-parallel group or "
                         "the mesh says which ranks shard")
    if mpu is None and device_mesh is None:
        return Topology(process_group)
    if device_mesh is None:
        return _from_mpu(mpu)
    mesh_topology = _from_mesh(device_mesh)
    if mpu is None:
        return mesh_topology
    from_mpu = _from_mpu(mpu)
    dp, mesh_ranks = sorted(_ranks(from_mpu.shard_group)), sorted(device_mesh.mesh.flatten().tolist())
    if dp != mesh_ranks:
        raise ValueError(f"device_mesh spans global ranks {mesh_ranks} but the mpu's data-parallel group is {dp}: "
                         "build the mesh over the data-parallel ranks (e.g. a sub-mesh of the full mesh), or pass "
                         "only the mpu")
    return Topology(mesh_topology.shard_group, mesh_topology.replicate_group, from_mpu.model_parallel_group,
                    from_mpu.tensor_parallel_rank, "mpu and device_mesh")


def _side_plan(group: ProcessGroup, counter: CommCounter, timeout: Optional[timedelta],
               backend: str) -> Optional[CommPlan]:
    """A plan for small blocking collectives over ``group`` (replicate or model-parallel), or None;
    ``backend`` is the shard plan's (the side groups live on the same devices)."""
    if group is None:
        return None
    return CommPlan(group, dist.get_rank(group), dist.get_world_size(group), counter.sibling(), timeout, backend)


def build_plan(topology: Topology, device: torch.device, comm: str, counter: CommCounter,
               timeout: Optional[timedelta] = None) -> CommPlan:
    """The shard group's plan (``choose_comm_plan``), carrying the replicate and model-parallel plans.

    Plain data parallelism gets exactly ``choose_comm_plan``'s plan.
    """
    plan = choose_comm_plan(topology.shard_group, device, comm, counter, timeout)
    if not (topology.hybrid or topology.model_parallel):
        return plan
    return dataclasses.replace(plan, replicate=_side_plan(topology.replicate_group, counter, timeout, plan.backend),
                               model_parallel=_side_plan(topology.model_parallel_group, counter, timeout,
                                                         plan.backend))


def agree_at_startup(plan: CommPlan, param_groups: Sequence[dict], device: torch.device, *, broadcast: bool) -> None:
    """Check that the ranks hold the same params and copy rank 0's to all: in the shard group, then
    across replicas (so every data-parallel rank starts from the same params). Collectives."""
    for group_plan in (plan, plan.replicate):
        if group_plan is None:
            continue
        agree_on_layout(group_plan, describe_params(param_groups), device)
        if broadcast:
            broadcast_params(group_plan, [p for g in param_groups for p in g["params"]])


def _named_params(params: Sequence[Any]) -> list[tuple[str, Any]]:
    """``(name, param)`` for the constructor's raw ``params`` (tensors, ``(name, param)`` pairs or groups)."""
    out: list[tuple[str, Any]] = []
    for i, item in enumerate(params):
        if isinstance(item, dict):
            names = item.get("param_names") or [f"param {j} of group {i}" for j in range(len(item["params"]))]
            out += list(zip((f"param {n!r}" if "param_names" in item else n for n in names), item["params"]))
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            out.append((f"param {item[0]!r}", item[1]))
        else:
            out.append((f"param {i}", item))
    return out


def check_no_dtensor(params: Sequence[Any]) -> None:
    """DTensor params (torch's ``parallelize_module``) are not supported with an mpu or a mesh: say so and what is.

    Raises:
        TypeError: naming the first DTensor param.
    """
    for name, p in _named_params(params):
        if type(p).__name__ == "DTensor":
            raise TypeError(f"{name} is a DTensor (torch tensor parallelism, parallelize_module): ShardedFusedAdam "
                            "shards plain tensors. Keep tensor parallelism Megatron-style (local tensors, split "
                            "params marked tensor_model_parallel=True) and pass mpu=..., or use "
                            "device_mesh=... for data-parallel and hybrid sharding; see docs/parallelism.md")

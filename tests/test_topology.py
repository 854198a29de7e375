"""The topology the optimizer reads (comm/topology.py): sources, validation, and failures named in global ranks."""
from __future__ import annotations

import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from sharded_fused_adam import CollectiveError, ShardedFusedAdamW
from sharded_fused_adam.comm.plans import CommCounter, choose_comm_plan
from sharded_fused_adam.comm.topology import Topology, is_tensor_parallel, resolve_topology
from test_parallelism import FakeMpu, _groups


class _NoMpu:
    def get_data_parallel_group(self):
        return None


class _NoTensorParallelRank(_NoMpu):
    def get_model_parallel_group(self):
        return None


class _ContextParallelMpu(FakeMpu):
    def get_context_parallel_world_size(self) -> int:
        return 2


@pytest.mark.parametrize("make, error, fragment", [
    (lambda: Topology(tensor_parallel_rank=-1), ValueError, "tensor_parallel_rank must be >= 0, got -1"),
    (lambda: resolve_topology(object(), object(), None), ValueError, "pass process_group, or mpu"),
    (lambda: resolve_topology(None, _NoMpu(), None), TypeError, "lacks ['get_model_parallel_group']"),
    (lambda: resolve_topology(None, _NoTensorParallelRank(), None), TypeError, "has neither"),
    (lambda: resolve_topology(None, _ContextParallelMpu(None, None, 0), None), ValueError,
     "context parallelism (size 2)"),
    (lambda: ShardedFusedAdamW([torch.nn.Parameter(torch.ones(2))], mpu=object()), TypeError,
     "mpu must provide Megatron's parallel_state functions"),
])
def test_bad_topologies_are_refused(make, error, fragment):
    with pytest.raises(error) as info:
        make()
    assert fragment in str(info.value)


def test_plain_data_parallel_is_the_default_topology():
    topology = resolve_topology(None, None, None)
    assert topology == Topology() and not topology.hybrid and not topology.model_parallel


def test_megatron_and_deepspeed_mark_split_params():
    split, copy, ds_split = torch.ones(2), torch.ones(2), torch.ones(2)
    split.tensor_model_parallel, ds_split.model_parallel = True, True
    assert is_tensor_parallel(split) and is_tensor_parallel(ds_split) and not is_tensor_parallel(copy)
    assert Topology(tensor_parallel_rank=1).counts_in_norm(split)
    assert not Topology(tensor_parallel_rank=1).counts_in_norm(copy)
    assert Topology(tensor_parallel_rank=0).counts_in_norm(copy)
    tied = torch.ones(2)
    tied.shared = True  # Megatron's last-stage copy of the word embeddings
    assert not Topology(tensor_parallel_rank=0).counts_in_norm(tied)


def _meshes_and_mpu(rank: int, world_size: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    dp_group, mp_group = _groups(rank)  # data-parallel peers r and r + 2
    mpu = FakeMpu(dp_group, mp_group, rank % 2)
    grid = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))  # "dp" sub-meshes: ranks r and r + 2
    errors = {}

    def error_of(**kwargs) -> str:
        with pytest.raises((ValueError, TypeError)) as info:
            ShardedFusedAdamW([torch.nn.Parameter(torch.ones(3))], **kwargs)
        return str(info.value)

    errors["names"] = error_of(device_mesh=grid)
    swapped = init_device_mesh("cpu", (2, 2), mesh_dim_names=("shard", "replicate"))
    errors["swapped"] = error_of(device_mesh=swapped)
    errors["unsharded"] = error_of(device_mesh=init_device_mesh("cpu", (4, 1), mesh_dim_names=("replicate", "shard")))
    errors["mesh_not_dp"] = error_of(mpu=mpu, device_mesh=grid["tp"])
    dtensor = torch.nn.Parameter(distribute_tensor(torch.ones(4), grid["tp"], [Replicate()]))
    with pytest.raises(TypeError) as info:
        ShardedFusedAdamW([("norm.weight", dtensor)], device_mesh=grid["dp"])
    errors["dtensor"] = str(info.value)
    both = ShardedFusedAdamW([torch.nn.Parameter(torch.ones(3))], mpu=mpu, device_mesh=grid["dp"])
    return dict(errors=errors, group=dist.get_process_group_ranks(both.process_group))


def test_meshes_and_mpus_are_checked(ranks):
    for rank, out in enumerate(ranks(_meshes_and_mpu, 4)):
        errors = out["errors"]
        assert "2-D with mesh_dim_names=('replicate', 'shard')" in errors["names"], errors
        assert "got 2-D with names ('shard', 'replicate')" in errors["swapped"], errors
        assert "'shard' dimension has size 1" in errors["unsharded"], errors
        tp = [rank - rank % 2, rank - rank % 2 + 1]
        assert f"device_mesh spans global ranks {tp} but the mpu's data-parallel group is" in errors["mesh_not_dp"]
        assert "param 'norm.weight' is a DTensor" in errors["dtensor"] and "mpu=" in errors["dtensor"], errors
        assert out["group"] == [rank % 2, rank % 2 + 2]  # mpu + a 1-D mesh over its data-parallel ranks


def _stuck_in_subgroup(rank: int, world_size: int) -> str:
    group = dist.new_group([1, 3])
    if rank == 3:
        time.sleep(8)  # alive but elsewhere
        return ""
    if rank != 1:
        return ""
    plan = choose_comm_plan(group, torch.device("cpu"), "auto", CommCounter(), timedelta(seconds=2))
    with pytest.raises(CollectiveError) as info:
        plan.all_reduce_(torch.ones(3))
    return str(info.value)


def test_a_stuck_rank_of_a_subgroup_is_named_by_its_global_rank(ranks):
    message = ranks(_stuck_in_subgroup, 4, timeout_s=60)[1]
    assert "failed on global rank 1 (rank 0 of 2 in the group of global ranks [1, 3])" in message, message
    assert "global rank(s) [3] never reached it" in message, message


def test_a_deepspeed_engine_hands_its_mpu_to_the_optimizer(monkeypatch):
    """Stage 0: the optimizer DeepSpeed builds from the config gets ``deepspeed.initialize(mpu=...)``."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from sharded_fused_adam.integrations.deepspeed_modes import ShardedMode, pending_loss_scale

    mpu = FakeMpu(None, None, 0)  # one process: plain data parallel groups
    with pending_loss_scale(None, mpu):
        opt = ShardedMode().build("ShardedFusedAdam", [torch.nn.Parameter(torch.ones(3))], {"lr": 1e-3})
    assert opt.options.mpu is mpu
    outside = ShardedMode().build("ShardedFusedAdam", [torch.nn.Parameter(torch.ones(3))], {"lr": 1e-3})
    assert outside.options.mpu is None

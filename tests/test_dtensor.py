"""DTensor params (FSDP2's fully_shard, distribute_tensor) are refused at construction, by name.

[Note: DTensor params] in core/validation.py says why: a DTensor is already sharded and has no
storage of its own to become a view into a flat buffer. Real FSDP2 on real gloo ranks.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from sharded_fused_adam import ShardedFusedAdam

pytest.importorskip("torch.distributed.fsdp")


def _construct(params) -> str:
    try:
        ShardedFusedAdam(params, lr=1e-3)
    except TypeError as exc:
        return str(exc)
    return "no error"


def _fully_sharded(rank: int, world_size: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
    return {"named": _construct(model.named_parameters()), "plain": _construct(model.parameters()),
            "untouched": all(type(p).__name__ == "DTensor" for p in model.parameters())}


def _distributed(rank: int, world_size: int) -> str:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    weight = nn.Parameter(distribute_tensor(torch.ones(4, 4), mesh, [Shard(0)]))
    return _construct([nn.Parameter(torch.ones(3)), weight])


def test_fsdp2_params_are_refused_naming_the_param_and_the_ways_that_work(ranks):
    for out in ranks(_fully_sharded, 2):
        assert "param '0.weight' is a DTensor" in out["named"]
        assert "param 0 (group 0, shape (8, 4)" in out["plain"] and "DTensor" in out["plain"]
        for fragment in ("Shard(dim=0)", "without fully_shard", "torch.optim.Adam/AdamW(fused=True)"):
            assert fragment in out["named"]
        assert out["untouched"]


def test_a_distribute_tensor_param_is_refused(ranks):
    (message,) = ranks(_distributed, 1)
    assert message.startswith("param 1 (group 0, shape (4, 4)") and "is a DTensor" in message

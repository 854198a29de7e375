"""Host offload of the optimizer state: bit for bit the resident optimizer, through checkpoints
at other world sizes, and reported as host bytes (see [Note: host offload] in core/storage.py).

On a CPU-only machine the host is the device, so these tests pin the bookkeeping (chunking,
double-buffered scratch, write-back, checkpoint seams), not a transfer over a host link.
"""
from __future__ import annotations

import copy

import pytest
import torch

from helpers import batch, loss_fn, make_net, param_groups
from test_memory_tier import _bits, _resume_phase, _state_mismatches
from test_parity import CONFIGS
import sharded_fused_adam.core.bucket as bucket_module
from sharded_fused_adam import ShardedFusedAdam

STEPS = 4
# (param dtype, state_dtype): fp32 models offload moments only, bf16 ones their fp32 masters too
STORAGES = {"fp32": (torch.float32, None), "bf16": (torch.bfloat16, None),
            "bf16_bf16_moments": (torch.bfloat16, torch.bfloat16)}


def _parity_rank(rank: int, world_size: int) -> dict:
    bucket_module.OFFLOAD_CHUNK_NUMEL = 64  # many chunks: both scratch buffers and chunk-crossing segments run
    out = {}
    for storage, (dtype, state_dtype) in STORAGES.items():
        for name, config in CONFIGS.items():
            kwargs = dict(config["opt_kwargs"])
            adamw = kwargs.pop("adamw", False)
            models = [make_net().to(dtype), make_net().to(dtype)]
            opts = [ShardedFusedAdam(param_groups(m, config.get("groups", "one")), adamw=adamw, offload=offload,
                                     state_dtype=state_dtype, **kwargs, **config.get("sharded_kwargs", {}))
                    for m, offload in zip(models, (None, "host"))]
            bad = 0
            for step in range(STEPS):
                for m, opt in zip(models, opts):
                    opt.zero_grad()
                    tokens, target = batch(step, rank, same_on_all_ranks=False)
                    loss_fn(m, tokens, target.to(dtype)).float().backward()
                    opt.step()
                bad += _state_mismatches(*opts, *models)
            out[f"{storage}/{name}"] = bad
    return out


@pytest.mark.parametrize("world_size", [2, 3])  # 3: padding in the shards
def test_offloaded_state_trains_bit_for_bit_like_resident_state(ranks, world_size):
    for r in ranks(_parity_rank, world_size):
        assert r == dict.fromkeys(r, 0), r  # no differing bit in params, masters or moments, any config


def _report_rank(rank: int, world_size: int, dtype: torch.dtype) -> dict:
    out = {}
    for offload in (None, "host"):
        model = make_net().to(dtype)
        opt = ShardedFusedAdam(model.parameters(), lr=1e-2, amsgrad=True, offload=offload)
        loss_fn(model, *batch(0, rank, same_on_all_ranks=False)).float().backward()
        opt.step()
        held = [t for b in opt.shard_state().buckets for t in b.state_shards().values()]
        out[offload] = dict(report=opt.memory_report().as_dict(), devices={str(t.device) for t in held})
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_memory_report_names_the_offloaded_bytes_as_host_bytes(ranks, dtype):
    for r in ranks(_report_rank, 2, dtype):
        resident, offloaded = r[None]["report"], r["host"]["report"]
        assert resident["host_state"] == 0 and resident["device_total"] == resident["total"]
        for key in ("params", "grad_shards", "master_shards", "moments"):
            assert offloaded[key] == resident[key], key  # the same state, held elsewhere
        assert offloaded["host_state"] == offloaded["master_shards"] + offloaded["moments"] > 0
        assert offloaded["device_total"] == offloaded["total"] - offloaded["host_state"]
        assert r["host"]["devices"] == {"cpu"}


def test_offloaded_checkpoints_resume_bit_for_bit_at_other_world_sizes(ranks, tmp_path):
    # Same gradients on every rank and power-of-two world sizes: the averages are exact, so any
    # difference would come from the state that travelled through the checkpoint.
    def options(offload) -> dict:
        return dict(amsgrad=True, offload=offload)

    uninterrupted = ranks(_resume_phase, 2, str(tmp_path / "a"), (0, 5), options(None))[0]
    ranks(_resume_phase, 2, str(tmp_path / "b"), (0, 3), options("host"))
    for world_size, offload in ((4, "host"), (1, None), (1, "host")):
        resumed = ranks(_resume_phase, world_size, str(tmp_path / "b"), (3, 5), options(offload))[0]
        assert all(torch.equal(a, b) for a, b in zip(resumed, uninterrupted)), (world_size, offload)


def test_gathered_state_dict_moves_between_offloaded_and_resident():
    model = make_net().to(torch.bfloat16)
    opt = ShardedFusedAdam(model.parameters(), lr=1e-2, offload="host")
    loss_fn(model, *batch(0, 0, same_on_all_ranks=True)).float().backward()
    opt.step()
    saved = opt.state_dict()
    resident = ShardedFusedAdam(copy.deepcopy(model).parameters(), lr=1e-2)
    resident.load_state_dict(saved)
    again = ShardedFusedAdam(copy.deepcopy(model).parameters(), lr=1e-2, offload="host")
    again.load_state_dict(resident.state_dict())
    for i, entry in again.state_dict()["state"].items():
        for key in ("exp_avg", "exp_avg_sq", "master_param"):
            assert torch.equal(_bits(entry[key]), _bits(saved["state"][i][key])), (i, key)


@pytest.mark.parametrize("kwargs,message", [
    (dict(offload="disk"), "offload must be one of (None, 'host'), got 'disk'"),
    (dict(offload="host", master_weights="split"), "cannot be combined with master_weights='split'"),
])
def test_bad_offload_options_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ShardedFusedAdam(make_net().parameters(), lr=1e-2, **kwargs)

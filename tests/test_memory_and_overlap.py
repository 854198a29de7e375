"""ZeRO-2 memory as the formulas say, and reductions that really start during backward."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import batch, loss_fn, make_net
from sharded_fused_adam import ShardedFusedAdam


def _mlp(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    # every numel is a multiple of 16 * 4, so at world size 2 and 4 there is no padding at all
    return nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256), nn.Linear(256, 128)).to(dtype)


def _memory_rank(rank: int, world_size: int, dtype: torch.dtype) -> dict:
    model = _mlp(dtype)
    psi = sum(p.numel() for p in model.parameters())
    opt = ShardedFusedAdam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 256, dtype=dtype)).float().sum().backward()
    opt.step()
    return dict(psi=psi, report=opt.memory_report().as_dict(), item=torch.empty((), dtype=dtype).element_size())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("world_size", [2, 4])
def test_memory_report_matches_the_zero_formulas(ranks, world_size, dtype):
    for r in ranks(_memory_rank, world_size, dtype):
        psi, rep, item = r["psi"], r["report"], r["item"]
        n = world_size
        assert rep["num_params"] == psi and rep["padding"] == 0
        assert rep["params"] == item * psi                      # the model itself, unsharded
        assert rep["grad_shards"] == 4 * psi // n               # fp32 gradient shard (ZeRO-2)
        assert rep["moments"] == 8 * psi // n                   # exp_avg + exp_avg_sq, sharded
        expected_masters = 0 if dtype == torch.float32 else 4 * psi // n  # no duplicate fp32 master
        assert rep["master_shards"] == expected_masters
        assert rep["optimizer_state"] == (8 if dtype == torch.float32 else 12) * psi // n


def _gpt_like_rank(rank: int, world_size: int) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(8192, 512), *[nn.Linear(512, 512) for _ in range(3)], nn.LayerNorm(512))
    psi = sum(p.numel() for p in model.parameters())
    opt = ShardedFusedAdam(model.parameters(), lr=1e-3)
    return dict(psi=psi, state=opt.memory_report().optimizer_state)


def test_optimizer_state_is_within_a_thousandth_of_8_psi_over_n(ranks):
    for r in ranks(_gpt_like_rank, 3):
        assert abs(r["state"] - 8 * r["psi"] / 3) <= 1e-3 * 8 * r["psi"] / 3, r


# ---- overlap -------------------------------------------------------------------------------

def _launch_timing_rank(rank: int, world_size: int, overlap: bool) -> list:
    model = make_net()
    opt = ShardedFusedAdam(model.parameters(), lr=1e-2, bucket_cap_mb=1e-6, overlap=overlap)
    seen = []
    # emb.weight's gradient is the last one backward produces: look at the buckets then.
    model.emb.weight.register_post_accumulate_grad_hook(
        lambda p: seen.append(opt._grads.num_launched))
    for step in range(3):
        opt.zero_grad()
        loss_fn(model, *batch(step, rank, same_on_all_ranks=False)).backward()
        opt.step()
    return seen


def test_with_overlap_buckets_start_reducing_before_backward_ends(ranks):
    launched_early = ranks(_launch_timing_rank, 2, True)[0]
    # The first backward only learns the order; afterwards most buckets are already on the wire.
    assert launched_early[0] == 0 and min(launched_early[1:]) >= 5, launched_early
    assert ranks(_launch_timing_rank, 2, False)[0] == [0, 0, 0]

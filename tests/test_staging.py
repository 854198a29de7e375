"""checkpoint/staging.py: every loader goes through one staged-load skeleton, and so loads alike.

The regression this pins: ``convert.load_named`` staged fp32 masters in the dtype of the
bucket's moments, so a bf16 model with ``state_dtype=torch.bfloat16`` got its masters rounded
to bf16 (up to 9.7e-4 off), silently, while ``load_state_dict`` was bitwise.
"""
from __future__ import annotations

import pytest
import torch

from helpers import batch, loss_fn, make_net
from sharded_fused_adam import ShardedFusedAdam, load_sharded, save_sharded
from sharded_fused_adam.checkpoint.convert import load_dcp, load_named, read_torch, save_dcp
from sharded_fused_adam.checkpoint.staging import StagedLoad, staged_keys

OPT = dict(lr=1e-2, weight_decay=0.05, amsgrad=True, state_dtype=torch.bfloat16)


def _model(dtype: torch.dtype) -> torch.nn.Module:
    return make_net().to(dtype)


def _trainable(model: torch.nn.Module) -> list:
    """Named params without the net's never-used one (``read_torch`` refuses a param without state)."""
    return [(name, p) for name, p in model.named_parameters() if not name.startswith("unused.")]


def _trained(dtype: torch.dtype, steps: int = 3, **options) -> tuple[torch.nn.Module, ShardedFusedAdam]:
    model = _model(dtype)
    opt = ShardedFusedAdam(_trainable(model), **{**OPT, **options})
    for step in range(steps):
        tokens, target = batch(step, 0, same_on_all_ranks=True)
        loss_fn(model, tokens, target.to(dtype)).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _load_state_dict(opt, saved, tmp_path):
    opt.load_state_dict(saved)


def _load_sharded(opt, saved, tmp_path):
    load_sharded(opt, tmp_path / "sharded")


def _load_named(opt, saved, tmp_path):
    load_named(opt, read_torch(tmp_path / "full.pt"))


def _load_dcp(opt, saved, tmp_path):
    load_dcp(opt, tmp_path / "dcp")


LOADERS = {"load_state_dict": _load_state_dict, "load_sharded": _load_sharded, "load_named": _load_named,
           "load_dcp": _load_dcp}


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_every_loader_restores_bf16_masters_and_moments_bitwise(tmp_path, loader):
    _, opt = _trained(torch.bfloat16)
    saved = opt.state_dict()
    masters = [entry["master_param"] for entry in saved["state"].values()]
    # the masters hold bits that bf16 cannot: a loader that rounds them through bf16 loses them
    assert any(not torch.equal(m, m.bfloat16().float()) for m in masters)
    torch.save(saved, tmp_path / "full.pt")
    save_sharded(opt, tmp_path / "sharded")
    save_dcp(opt, tmp_path / "dcp")

    fresh = ShardedFusedAdam(_trainable(_model(torch.bfloat16)), **OPT)
    LOADERS[loader](fresh, saved, tmp_path)
    got = fresh.state_dict()
    assert sorted(got["state"]) == sorted(saved["state"])
    for index, entry in saved["state"].items():
        for key, value in entry.items():
            assert torch.equal(got["state"][index][key], value), (loader, index, key)


def test_fp64_moments_are_staged_in_fp64(tmp_path):
    """Staging tensors take the bucket's load dtype: an fp64 model's moments are never rounded to fp32."""
    _, opt = _trained(torch.float64, state_dtype=None)
    staging = StagedLoad(opt.shard_state())
    assert staging.pieces and all(t.dtype == torch.float64 for pieces in staging.pieces for t in pieces.values())
    save_dcp(opt, tmp_path / "dcp")
    fresh = ShardedFusedAdam(_trainable(_model(torch.float64)), **{**OPT, "state_dtype": None})
    load_dcp(fresh, tmp_path / "dcp")
    saved, got = opt.state_dict(), fresh.state_dict()
    for index, entry in saved["state"].items():
        for key, value in entry.items():
            assert torch.equal(got["state"][index][key], value), (index, key)


def test_staged_keys_follow_the_rule_and_the_bucket_precision():
    _, low = _trained(torch.bfloat16, steps=0)
    _, full = _trained(torch.float32, steps=0)
    assert {staged_keys(b) for b in low.shard_state().buckets} == {
        ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master_param")}
    assert {staged_keys(b) for b in full.shard_state().buckets} == {("exp_avg", "exp_avg_sq", "max_exp_avg_sq")}


def test_a_key_no_param_had_is_dropped_and_nothing_changes_before_commit():
    _, opt = _trained(torch.float32)
    before = opt.state_dict()
    staging = StagedLoad(opt.shard_state())
    staging.fill(lambda key, index, start, end, out: key != "max_exp_avg_sq" and bool(out.fill_(1.0).numel() + 1))
    assert all("max_exp_avg_sq" not in pieces and "exp_avg" in pieces for pieces in staging.pieces)
    after_fill = opt.state_dict()
    for index, entry in before["state"].items():
        for key, value in entry.items():
            assert torch.equal(after_fill["state"][index][key], value), (index, key)
    staging.commit(opt.param_groups, lambda index: 7)
    committed = opt.state_dict()["state"]
    assert all(int(entry["step"]) == 7 for entry in committed.values())
    assert all(torch.all(entry["exp_avg"] == 1.0) for entry in committed.values())
    assert all(torch.all(entry["max_exp_avg_sq"] == 0.0) for entry in committed.values())  # dropped: zeros

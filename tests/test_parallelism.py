"""Tensor x data, pipeline x data and hybrid sharding on 4 gloo ranks against one full model.

The oracle is a single-process full model trained by ``torch.optim.AdamW(fused=True)`` with
torch's own ``clip_grad_norm_`` (over the full model's params). Every rank runs the oracle
too: at each step it computes each data-parallel rank's full gradient at the oracle's
params, hands its own rank the slice its params hold (Megatron's tensor-parallel split or a
pipeline stage's layers) and averages them for the oracle, exactly as the distributed run
would have computed them. Tolerances: without clipping the averaged gradient is the same
sum in the same order, so the params are bitwise equal; with clipping our global norm sums
the squares in another order than torch's, so the coefficient and the params differ in the
last bits (1e-5 absolute after 8 steps on O(1) params; the norm within 1e-5 relative).
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist

import sharded_fused_adam
from sharded_fused_adam import ShardedFusedAdamW

STEPS = 8
TOL = 1e-5
D, H, O, BATCH = 6, 8, 4, 5
NAMES = ("g", "w1", "b1", "w2", "b2")


def _full_model(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"g": 1 + 0.1 * torch.randn(D, generator=gen), "w1": torch.randn(H, D, generator=gen) / 2,
            "b1": torch.randn(H, generator=gen) / 4, "w2": torch.randn(O, H, generator=gen) / 2,
            "b2": torch.randn(O, generator=gen) / 4}


def _loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    hidden = torch.relu((x * p["g"]) @ p["w1"].T + p["b1"])
    return ((hidden @ p["w2"].T + p["b2"] - y) ** 2).mean() * 40  # large enough that a norm of 1 clips


def _full_grads(params: list[torch.Tensor], step: int, dp_rank: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 * step + dp_rank)
    x, y = torch.randn(BATCH, D, generator=gen), torch.randn(BATCH, O, generator=gen)
    leaves = {n: p.detach().clone().requires_grad_() for n, p in zip(NAMES, params)}
    _loss(leaves, x, y).backward()
    return {n: leaves[n].grad for n in NAMES}


# ---- how each layout splits the full model ---------------------------------------------------
def _tp_slice(name: str, t: torch.Tensor, tp_rank: int) -> torch.Tensor:
    """Megatron's MLP: w1/b1 column-parallel (rows split), w2 row-parallel (columns split)."""
    if name in ("w1", "b1"):
        return t.chunk(2, dim=0)[tp_rank]
    if name == "w2":
        return t.chunk(2, dim=1)[tp_rank]
    return t  # g, b2: duplicated on every tensor-parallel rank


STAGES = (("g", "w1", "b1"), ("w2", "b2"))  # unequal param sets on the two pipeline stages


class FakeMpu:
    """The functions of Megatron's ``parallel_state`` that the optimizer reads."""

    def __init__(self, dp_group, mp_group, tp_rank: int):
        self._dp, self._mp, self._tp_rank = dp_group, mp_group, tp_rank

    def get_data_parallel_group(self):
        return self._dp

    def get_model_parallel_group(self):
        return self._mp

    def get_tensor_model_parallel_rank(self) -> int:
        return self._tp_rank


def _groups(rank: int) -> tuple:
    """Ranks (dp, mp): model-parallel peers are 2k and 2k+1; data-parallel peers are r and r+2."""
    mp = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    dp = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    return dp[rank % 2], mp[rank // 2]


def _local_params(layout: str, rank: int, full: dict[str, torch.Tensor]) -> tuple[list[str], list[torch.Tensor]]:
    if layout == "tp":
        names = list(NAMES)
        params = [torch.nn.Parameter(_tp_slice(n, full[n], rank % 2).clone()) for n in names]
        for n, p in zip(names, params):
            p.tensor_model_parallel = n in ("w1", "b1", "w2")
        return names, params
    names = list(STAGES[rank % 2])
    return names, [torch.nn.Parameter(full[n].clone()) for n in names]


def _local_grad(layout: str, rank: int, name: str, grad: torch.Tensor) -> torch.Tensor:
    return _tp_slice(name, grad, rank % 2) if layout == "tp" else grad


def _train_3d(rank: int, world_size: int, layout: str, clip: str, inject: tuple[int, ...],
              grads: str = "sharded") -> dict:
    dp_group, mp_group = _groups(rank)
    dp_rank, tp_rank = rank // 2, (rank % 2 if layout == "tp" else 0)
    full = _full_model()
    oracle = [torch.nn.Parameter(full[n].clone()) for n in NAMES]
    ref = torch.optim.AdamW(oracle, lr=1e-2, weight_decay=0.1, fused=True)
    names, params = _local_params(layout, rank, full)
    kwargs = dict(max_grad_norm=1.0) if clip == "max_grad_norm" else {}
    scaled = bool(inject)
    opt = ShardedFusedAdamW(list(zip(names, params)), lr=1e-2, weight_decay=0.1,
                            mpu=FakeMpu(dp_group, mp_group, tp_rank), loss_scale="dynamic" if scaled else None,
                            grads=grads, **kwargs)
    scale = opt.loss_scale
    diffs, norms, ref_norms, skipped, scales = [], [], [], [], []
    for step in range(STEPS):
        grads = [_full_grads(oracle, step, d) for d in range(2)]
        for n, p in zip(names, params):
            p.grad = _local_grad(layout, rank, n, grads[dp_rank][n]) * scale
        # The overflow is in one pipeline stage's param (w2 lives on stage 1 only), on one rank.
        if step in inject and rank == 1:
            params[names.index("w2")].grad[0, 0] = float("inf")
        if clip == "clip_grad_norm_":
            norms.append(float(sharded_fused_adam.clip_grad_norm_(params, 1.0)))
        opt.step()
        skipped.append(opt.overflow)
        scales.append(opt.loss_scale)
        if step not in inject:  # the oracle skips the steps that overflowed
            for n, p in zip(NAMES, oracle):
                p.grad = (grads[0][n] + grads[1][n]) / 2
            if clip != "none":
                ref_norms.append(float(torch.nn.utils.clip_grad_norm_(oracle, 1.0)))
            ref.step()
            if clip == "max_grad_norm":
                norms.append(opt.get_global_grad_norm())
        scale = opt.loss_scale
        opt.zero_grad()
        expected = [_local_grad(layout, rank, n, dict(zip(NAMES, oracle))[n]) for n in names]
        diffs.append(max((p - e).abs().max().item() for p, e in zip(params, expected)))
    return dict(diffs=diffs, norms=norms, ref_norms=ref_norms, skipped=skipped, scales=scales)


@pytest.mark.parametrize("layout", ["tp", "pp"])
@pytest.mark.parametrize("clip", ["none", "max_grad_norm", "clip_grad_norm_"])
def test_3d_layouts_match_one_full_model(ranks, layout, clip):
    out = ranks(_train_3d, 4, layout, clip, ())
    for r in out:
        if clip == "none":  # the same sums in the same order: bitwise
            assert max(r["diffs"]) == 0.0, r["diffs"]
        else:
            assert max(r["diffs"]) <= TOL, r["diffs"]
            assert len(r["norms"]) == STEPS and r["norms"] == pytest.approx(r["ref_norms"], rel=TOL)
            assert min(r["ref_norms"]) > 1.0, "the test must clip on every step"
        assert r["norms"] == out[0]["norms"]  # every rank reports the same norm


@pytest.mark.parametrize("clip", ["max_grad_norm", "clip_grad_norm_"])
def test_replicated_gradients_clip_by_the_global_norm_too(ranks, clip):
    for r in ranks(_train_3d, 4, "tp", clip, (), "replicated"):
        assert max(r["diffs"]) <= TOL, r["diffs"]
        assert r["norms"] == pytest.approx(r["ref_norms"], rel=TOL)


@pytest.mark.parametrize("layout", ["tp", "pp"])
def test_an_overflow_in_one_stage_skips_the_step_everywhere(ranks, layout):
    inject = (2, 4)
    out = ranks(_train_3d, 4, layout, "max_grad_norm", inject)
    expected_skips = [step in inject for step in range(STEPS)]
    for r in out:
        assert r["skipped"] == expected_skips
        assert r["scales"] == out[0]["scales"]  # the same loss-scale verdict on every rank
        assert max(r["diffs"]) <= TOL, r["diffs"]
    assert out[0]["scales"][-1] == 2.0 ** 15  # hysteresis 2: the second overflow halves the scale


# ---- model-parallel gradient reductions under grads="sharded" -----------------------------------
def _sequence_parallel(rank: int, world_size: int, use_hook: bool, grads: str = "sharded") -> dict:
    """A sequence-parallel norm weight: each tensor-parallel rank's backward gives a partial gradient."""
    dp_group, mp_group = _groups(rank)
    weight = torch.nn.Parameter(torch.ones(D))
    ref_weight = torch.nn.Parameter(torch.ones(D))
    opt = ShardedFusedAdamW([weight], lr=1e-2, mpu=FakeMpu(dp_group, mp_group, rank % 2), grads=grads)
    ref = torch.optim.AdamW([ref_weight], lr=1e-2, fused=True)
    if use_hook:
        opt.register_pre_reduce_hook(lambda: dist.all_reduce(weight.grad, group=mp_group))
    caught = []
    for step in range(3):
        partial = [[torch.randn(D, generator=torch.Generator().manual_seed(100 * step + 10 * d + t))
                    for t in range(2)] for d in range(2)]
        (weight * partial[rank // 2][rank % 2]).sum().backward()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            if not use_hook and weight.grad is not None:  # what user code without the hook does
                dist.all_reduce(weight.grad, group=mp_group)
            opt.step()
        caught += [str(w.message) for w in seen]
        ref_weight.grad = ((partial[0][0] + partial[0][1]) + (partial[1][0] + partial[1][1])) / 2
        ref.step()
        opt.zero_grad()
    return dict(diff=(weight - ref_weight).abs().max().item(), warnings=caught)


@pytest.mark.parametrize("grads", ["sharded", "replicated"])
def test_a_pre_reduce_hook_reduces_model_parallel_gradients(ranks, grads):
    for r in ranks(_sequence_parallel, 4, True, grads):
        assert r["diff"] <= 1e-6, r  # (p0 + p1) summed over TP first: another order than the oracle's


def test_reducing_a_none_gradient_is_loud(ranks):
    for r in ranks(_sequence_parallel, 4, False):
        assert r["diff"] > 1e-3  # the reduction did nothing, and the user is told so:
        assert any("register_pre_reduce_hook" in w for w in r["warnings"]), r["warnings"]


# ---- hybrid sharding from a DeviceMesh ----------------------------------------------------------
def _mesh():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))


def _hybrid(rank: int, world_size: int, clip: bool, folder: str, grads: str = "sharded") -> dict:
    mesh = _mesh()  # shard groups [0, 1] and [2, 3]; replicate groups [0, 2] and [1, 3]
    full = _full_model()
    oracle = [torch.nn.Parameter(full[n].clone()) for n in NAMES]
    params = [torch.nn.Parameter(full[n].clone()) for n in NAMES]
    ref = torch.optim.AdamW(oracle, lr=1e-2, weight_decay=0.1, fused=True)
    opt = ShardedFusedAdamW(list(zip(NAMES, params)), lr=1e-2, weight_decay=0.1, device_mesh=mesh,
                            max_grad_norm=1.0 if clip else None, grads=grads)
    diffs, norms, ref_norms = [], [], []
    for step in range(STEPS):
        grads = [_full_grads(oracle, step, d) for d in range(4)]
        for n, p in zip(NAMES, params):
            p.grad = grads[rank][n].clone()
        opt.step()
        for n, p in zip(NAMES, oracle):  # the shard group sums first, then the replicas: the same order
            p.grad = ((grads[0][n] + grads[1][n]) + (grads[2][n] + grads[3][n])) / 4
        if clip:
            ref_norms.append(float(torch.nn.utils.clip_grad_norm_(oracle, 1.0)))
            norms.append(opt.get_global_grad_norm())
        ref.step()
        opt.zero_grad()
        diffs.append(max((p - e).abs().max().item() for p, e in zip(params, oracle)))
    report = opt.memory_report()
    out = dict(diffs=diffs, norms=norms, ref_norms=ref_norms, comm=dict(opt.last_step_comm_bytes),
               shards=report.world_size, moments=report.moments, params=report.params)
    if folder:
        final = sharded_fused_adam.save_sharded(opt, folder)
        out["files"] = sorted(f.name for f in final.iterdir() if f.name.startswith("rank"))
        copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
        plain = ShardedFusedAdamW(list(zip(NAMES, copies)), lr=1e-2, weight_decay=0.1)  # 4 shards, no mesh
        sharded_fused_adam.load_sharded(plain, folder)
        mine, theirs = opt.state_dict(), plain.state_dict()
        out["reloaded_equal"] = all(torch.equal(mine["state"][i][k], theirs["state"][i][k])
                                    for i in mine["state"] for k in mine["state"][i])
    return out


def _hybrid_unfreeze(rank: int, world_size: int) -> list[float]:
    """The first param frozen at construction and unfrozen after two steps, on every rank at once."""
    mesh = _mesh()
    full = _full_model()
    oracle = [torch.nn.Parameter(full[n].clone()) for n in NAMES]
    params = [torch.nn.Parameter(full[n].clone()) for n in NAMES]
    for p in (oracle[0], params[0]):
        p.requires_grad_(False)
    ref = torch.optim.AdamW(oracle, lr=1e-2, weight_decay=0.1, fused=True)
    opt = ShardedFusedAdamW(list(zip(NAMES, params)), lr=1e-2, weight_decay=0.1, device_mesh=mesh)
    diffs = []
    for step in range(STEPS):
        if step == 2:
            for p in (oracle[0], params[0]):
                p.requires_grad_(True)
        grads = [_full_grads(oracle, step, d) for d in range(4)]
        for n, p in zip(NAMES, params):
            p.grad = grads[rank][n].clone() if p.requires_grad else None
        opt.step()
        for n, p in zip(NAMES, oracle):
            p.grad = ((grads[0][n] + grads[1][n]) + (grads[2][n] + grads[3][n])) / 4 if p.requires_grad else None
        ref.step()
        opt.zero_grad()
        ref.zero_grad()
        diffs.append(max((p - e).abs().max().item() for p, e in zip(params, oracle)))
    return diffs


def test_hybrid_sharding_takes_params_unfrozen_mid_training(ranks):
    for diffs in ranks(_hybrid_unfreeze, 4):
        assert max(diffs) == 0.0, diffs


def test_hybrid_sharding_with_replicated_gradients(ranks):
    for r in ranks(_hybrid, 4, False, "", "replicated"):
        assert max(r["diffs"]) == 0.0, r["diffs"]  # all-reduced over the shard group, then the replicas


@pytest.mark.parametrize("clip", [False, True])
def test_hybrid_sharding_matches_one_full_model(ranks, tmp_path, clip):
    out = ranks(_hybrid, 4, clip, str(tmp_path / "ckpt") if clip else "")
    for r in out:
        if clip:
            assert max(r["diffs"]) <= TOL, r["diffs"]
            assert r["norms"] == pytest.approx(r["ref_norms"], rel=TOL) and min(r["ref_norms"]) > 1.0
            assert r["files"] == ["rank00000.bin", "rank00000.json", "rank00001.bin", "rank00001.json"]
            assert r["reloaded_equal"]  # replica 0's files, read back at 4 plain shards
        else:
            assert max(r["diffs"]) == 0.0, r["diffs"]
        assert r["shards"] == 2 and r["moments"] == r["params"]  # exp_avg + exp_avg_sq: 2 x 1/2 of the buffer
        # the replicas all-reduce only the shard: half of what the shard group reduce-scatters
        assert r["comm"]["all_reduce"] * 2 == r["comm"]["reduce_scatter"] > 0, r["comm"]


def _ddp_on_another_group(rank: int, world_size: int) -> str:
    mesh = _mesh()
    model = torch.nn.Linear(4, 2)
    ddp = torch.nn.parallel.DistributedDataParallel(model, process_group=mesh.get_group("replicate"))
    opt = ShardedFusedAdamW(model.parameters(), device_mesh=mesh)
    with pytest.raises(ValueError) as info:
        ddp(torch.randn(3, 4)).sum().backward()
    del opt
    return str(info.value)


def test_a_ddp_wrapper_over_another_group_is_an_error(ranks):
    for rank, message in enumerate(ranks(_ddp_on_another_group, 4)):
        replicate = [rank % 2, rank % 2 + 2]
        assert f"DistributedDataParallel over global ranks {replicate}" in message, message
        assert "device_mesh" in message and "shard group" in message, message

"""Training-grade numerics on real gloo ranks: overflow skip, clipping, loss scaling,
torch.amp.GradScaler, gradient accumulation and reduction precision.

Tolerances: bitwise where the arithmetic is identical (same grads on every rank, world
size a power of two, power-of-two loss scales). Clipping compares against
``torch.nn.utils.clip_grad_norm_`` at 1e-6: the global norm is summed per shard and per
rank instead of per param, a different rounding order. Gradient accumulation compares a
sum of 4 micro-batch gradients with one 4x batch at 1e-6: same math, different order.
"""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

from helpers import averaged_grads, batch, loss_fn, make_net
from sharded_fused_adam import DynamicLossScaler, ShardedFusedAdam

warnings.filterwarnings("ignore", message="GradScaler is going to stop passing itself", category=FutureWarning)


def _params_equal(a, b) -> float:
    return max((x.detach() - y.detach()).abs().max().item() for x, y in zip(a.parameters(), b.parameters()))


# ---- overflow on one rank skips the step everywhere ----------------------------------------

def _overflow_rank(rank: int, world_size: int, bad: float) -> dict:
    model, ref = make_net(), make_net()
    opt = ShardedFusedAdam(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2, fused=True)
    overflow, steps = [], []
    for step in range(5):
        tokens, target = batch(step, rank, same_on_all_ranks=True)
        opt.zero_grad()
        loss = loss_fn(model, tokens, target)
        if step == 2 and rank == world_size - 1:
            loss = loss * bad  # only the last rank sees a non-finite gradient
        loss.backward()
        opt.step()
        overflow.append(opt.overflow)
        steps.append(max(max(b.steps) for b in opt.shard_state().buckets))
        if step != 2:  # the reference simply skips the same step
            for p, g in zip(ref.parameters(), averaged_grads(ref, [(tokens, target)])):
                p.grad = g
            ref_opt.step()
    return dict(overflow=overflow, steps=steps, diff=_params_equal(model, ref))


@pytest.mark.parametrize("bad", [math.inf, math.nan])
@pytest.mark.parametrize("world_size", [2, 3])
def test_non_finite_gradient_on_one_rank_skips_the_step_on_every_rank(ranks, world_size, bad):
    for r in ranks(_overflow_rank, world_size, bad):
        assert r["overflow"] == [False, False, True, False, False]
        assert r["steps"] == [1, 2, 2, 3, 4]
        assert r["diff"] <= (0.0 if world_size == 2 else 1e-6)


def _one_bad_element_rank(rank: int, world_size: int) -> tuple[bool, bool]:
    model = make_net()
    opt = ShardedFusedAdam(model.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        grad = torch.full_like(p, 0.1)
        if rank == 0 and p is model.fc1.weight:
            grad[3, 4] = math.inf  # after the reduction it sits in one rank's shard only
        p.grad = grad
    opt.step()
    return opt.overflow, all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_one_non_finite_element_on_one_rank_skips_the_step_on_every_rank(ranks):
    assert ranks(_one_bad_element_rank, 3) == [(True, True)] * 3



def _huge_finite_rank(rank: int, world_size: int, bad: float) -> tuple[bool, bool]:
    """Rank 1 sends finite gradients whose squares overflow fp32; ``bad`` (if set) goes into rank 0's."""
    model, ref = make_net(), make_net()
    opt = ShardedFusedAdam(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2, fused=True)
    grads = []
    for p in model.parameters():
        grad = torch.full_like(p, 1e20 if rank == 1 else 0.1)  # sum of squares: inf; elements: finite
        if rank == 0 and p is model.fc1.weight:
            grad[0, 0] = bad
        grads.append(grad)
        p.grad = grad
    opt.step()
    mean = [(torch.full_like(g, 1e20) + torch.full_like(g, 0.1)) / 2 for g in grads]
    for p, g in zip(ref.parameters(), mean):
        p.grad = g
    ref_opt.step()
    same = all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))
    return opt.overflow, same


def test_finite_gradients_whose_norm_overflows_are_not_skipped(ranks):
    """The cheap per-rank flag cannot tell an overflowing sum of squares from a non-finite element;
    the element check that follows it can (see [Note: one host sync per step])."""
    assert ranks(_huge_finite_rank, 2, 0.1) == [(False, True)] * 2
    assert [overflow for overflow, _ in ranks(_huge_finite_rank, 2, math.nan)] == [True, True]

# ---- global-norm clipping ------------------------------------------------------------------

def _clip_rank(rank: int, world_size: int, norm_type: float, via: str) -> dict:
    model, ref = make_net(), make_net()
    kwargs = dict(max_grad_norm=0.05) if via == "option" else {}
    opt = ShardedFusedAdam(model.parameters(), lr=1e-2, **kwargs)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2, fused=True)
    norms, ref_norms = [], []
    for step in range(4):
        data = [batch(step, r, same_on_all_ranks=False) for r in range(world_size)]
        opt.zero_grad()
        loss_fn(model, *data[rank]).backward()
        if via == "call":
            norms.append(opt.clip_grad_norm_(0.05, norm_type).item())
        opt.step()
        if via == "option":
            norms.append(opt.get_global_grad_norm())
        for p, g in zip(ref.parameters(), averaged_grads(ref, data)):
            p.grad = g
        ref_norms.append(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05, norm_type).item())
        ref_opt.step()
    return dict(norms=norms, ref_norms=ref_norms, diff=_params_equal(model, ref))


@pytest.mark.parametrize("norm_type,via", [(2.0, "call"), (math.inf, "call"), (2.0, "option")])
def test_clipping_matches_torch_clip_grad_norm(ranks, norm_type, via):
    for r in ranks(_clip_rank, 2, norm_type, via):
        assert r["norms"] == pytest.approx(r["ref_norms"], rel=1e-6)
        assert max(r["ref_norms"]) > 0.05, "the test must actually clip"
        assert r["diff"] <= 1e-6


def test_clip_epsilon_decides_when_the_norm_is_tiny():
    # Norms of 1e-6, 5e-7 and 3e-6 against max_grad_norm=1e-6: torch's 1e-6 in the denominator
    # halves the first gradient, and is the only reason the second is clipped at all. eps=1 and
    # lr=1 make Adam's update ~linear in the clipped gradient, so the coefficient shows in the params.
    ours = [torch.zeros(600, requires_grad=True), torch.zeros(7, 57, requires_grad=True)]
    ref = [p.detach().clone().requires_grad_() for p in ours]
    opt = ShardedFusedAdam(ours, lr=1.0, eps=1.0, max_grad_norm=1e-6)
    ref_opt = torch.optim.Adam(ref, lr=1.0, eps=1.0, fused=True)
    for norm in (1e-6, 5e-7, 3e-6):
        for params in (ours, ref):
            for p in params:
                p.grad = torch.full_like(p, norm / 999**0.5)  # 999 elements in all
        torch.nn.utils.clip_grad_norm_(ref, 1e-6)
        opt.step()
        ref_opt.step()
        assert opt.get_global_grad_norm() == pytest.approx(norm, rel=1e-5)
        scale = max(q.abs().max().item() for q in ref)
        assert max((p - q).abs().max().item() for p, q in zip(ours, ref)) <= 1e-5 * scale


# ---- torch.amp.GradScaler ------------------------------------------------------------------

def _grad_scaler_rank(rank: int, world_size: int, explicit_unscale: bool, inf_at: int) -> dict:
    model, ref = make_net(), make_net()
    opt = ShardedFusedAdam(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    ref_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    scales, norms = [], []
    for step in range(6):
        tokens, target = batch(step, rank, same_on_all_ranks=True)
        for m, o, s, poison in ((model, opt, scaler, rank == world_size - 1), (ref, ref_opt, ref_scaler, True)):
            o.zero_grad()
            loss = loss_fn(m, tokens, target)
            if step == inf_at and poison:
                loss = loss * math.inf
            s.scale(loss).backward()
            if explicit_unscale:
                s.unscale_(o)
            s.step(o)
            s.update()
        scales.append((scaler.get_scale(), ref_scaler.get_scale()))
        if step != inf_at:  # the reference's grads are unscaled in place by its scaler's step
            ref_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ref.parameters()
                                                             if p.grad is not None])).item()
            norms.append((opt.get_global_grad_norm(), ref_norm))
    return dict(scales=scales, diff=_params_equal(model, ref), norms=norms)


@pytest.mark.parametrize("explicit_unscale", [False, True])
def test_grad_scaler_loop_matches_single_process(ranks, explicit_unscale):
    for r in ranks(_grad_scaler_rank, 2, explicit_unscale, -1):
        assert all(a == b for a, b in r["scales"]) and r["scales"][-1][0] > 2.0**10
        assert r["diff"] == 0.0
        for ours, ref_norm in r["norms"]:  # get_global_grad_norm() is of the unscaled gradients
            assert ours == pytest.approx(ref_norm, rel=1e-5)


def test_grad_scaler_backs_off_on_every_rank_when_one_rank_overflows(ranks):
    results = ranks(_grad_scaler_rank, 3, False, 3)
    for r in results:
        assert all(a == b for a, b in r["scales"]), r["scales"]
        assert r["scales"][3][0] == r["scales"][2][0] / 2
        assert r["diff"] <= 1e-6
    assert len({tuple(r["scales"]) for r in results}) == 1


# ---- our own loss scaling with an fp16 model -----------------------------------------------

def _fp16_rank(rank: int, world_size: int) -> dict:
    model = make_net().half()
    scaler = DynamicLossScaler(2.0**8, growth_interval=3, hysteresis=2)
    opt = ShardedFusedAdam(model.parameters(), lr=1e-2, loss_scale=scaler)
    losses, events = [], []
    for step in range(12):
        tokens, target = batch(step % 3, rank, same_on_all_ranks=False)
        opt.zero_grad()
        loss = loss_fn(model, tokens, target.half())
        before = opt.loss_scale
        opt.backward(loss * (6e4 if step in (4, 5, 6) else 1.0))  # 6e4 * 2**8 overflows fp16
        opt.step()
        events.append((before, opt.overflow, opt.loss_scale))
        losses.append(loss.item())
    return dict(events=events, losses=losses)


# (scale before the step, overflow, scale after), worked out by hand from DynamicLossScaler's
# documented rules: init 2**8, growth every 3 clean steps, hysteresis 2, backoff 0.5; the loss is
# multiplied by 6e4 at steps 4-6 (6e4 * 2**8 overflows fp16).
FP16_SCHEDULE = [
    (256, False, 256), (256, False, 256), (256, False, 512),  # 3 clean steps: grow
    (512, False, 512),
    (512, True, 512),    # first overflow only uses up the hysteresis
    (512, True, 256),    # then each overflow halves the scale
    (256, True, 128),
    (128, False, 128), (128, False, 128), (128, False, 256),  # 3 clean steps: grow again
    (256, False, 256), (256, False, 256),
]


def test_fp16_dynamic_loss_scaling_grows_backs_off_and_trains(ranks):
    results = ranks(_fp16_rank, 2)
    assert results[0]["events"] == results[1]["events"]
    assert results[0]["events"] == FP16_SCHEDULE
    assert results[0]["losses"][-1] < results[0]["losses"][0]


# ---- bf16 params with fp32 masters: torch AdamW on fp32 copies is the reference ----------

def _bf16_rank(rank: int, world_size: int, reduce_dtype: torch.dtype) -> dict:
    model = make_net().to(torch.bfloat16)
    params = list(model.parameters())
    ref = [p.detach().float().requires_grad_() for p in params]  # fp32 copies: the masters' reference
    opt = ShardedFusedAdam(params, lr=1e-3, weight_decay=0.1, adamw=True, reduce_dtype=reduce_dtype)
    ref_opt = torch.optim.AdamW(ref, lr=1e-3, weight_decay=0.1, fused=True)
    worst_param = 0.0
    for step in range(6):
        grads = []  # every rank's bf16 gradient of the current bf16 model (the same on every rank)
        for r in range(world_size):
            tokens, target = batch(step, r, same_on_all_ranks=False)
            loss = loss_fn(model, tokens, target.to(torch.bfloat16)).float()
            grads.append(torch.autograd.grad(loss, params, allow_unused=True))
        for p, g in zip(params, grads[rank]):
            p.grad = g
        opt.step()
        opt.zero_grad()
        for q, per_rank in zip(ref, zip(*grads)):
            if per_rank[0] is None:
                q.grad = None
                continue
            total = per_rank[0].float() + per_rank[1].float()  # 2 ranks: the sum the reduction forms
            if reduce_dtype == torch.bfloat16:
                total = total.to(torch.bfloat16).float()  # the sum is rounded to bf16 on the wire
            q.grad = total / world_size
        ref_opt.step()
        worst_param = max(worst_param, max((p.float() - q.detach().to(torch.bfloat16).float()).abs().max().item()
                                           for p, q in zip(params, ref)))
    masters = opt.state_dict()["state"]
    worst_master = max((masters[i]["master_param"] - q.detach()).abs().max().item()
                       for i, q in enumerate(ref) if i in masters)
    moved = max((q.detach() - p0).abs().max().item()
                for q, p0 in zip(ref, (p.float() for p in make_net().to(torch.bfloat16).parameters())))
    return dict(param=worst_param, master=worst_master, moved=moved, num_masters=len(masters))


@pytest.mark.parametrize("reduce_dtype", [torch.float32, torch.bfloat16])
def test_bf16_masters_equal_torch_adamw_on_fp32_copies(ranks, reduce_dtype):
    # Same bf16 gradients, averaged exactly (two ranks: one fp32 addition, a halving), then the
    # same fused kernel on fp32: the masters are torch's fp32 params bit for bit, and the bf16
    # params are their rounding. 6 steps of lr 1e-3 move params by ~6e-3, below bf16's
    # resolution for O(1) values: bf16 Adam without masters would lose them.
    for r in ranks(_bf16_rank, 2, reduce_dtype):
        assert r["num_masters"] == 9 and r["moved"] > 1e-3, r  # OddNet.unused (2 params) never steps
        assert r["master"] == 0.0 and r["param"] == 0.0, r


# ---- gradient accumulation ----------------------------------------------------------------

def _accumulation_rank(rank: int, world_size: int, local: bool) -> dict:
    model, ref = make_net(), make_net()
    opt = ShardedFusedAdam(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-2, fused=True)
    comm = []
    for step in range(3):
        micro = [batch(10 * step + k, rank, same_on_all_ranks=False) for k in range(4)]
        opt.zero_grad()
        for k, (tokens, target) in enumerate(micro):
            ctx = opt.no_sync() if local and k < 3 else _nullcontext()
            with ctx:
                (loss_fn(model, tokens, target) / 4).backward()
        opt.step()
        comm.append(sum(opt.last_step_comm_bytes.values()))
        big = []
        for r in range(world_size):
            parts = [batch(10 * step + k, r, same_on_all_ranks=False) for k in range(4)]
            big.append((torch.cat([t for t, _ in parts]), torch.cat([y for _, y in parts])))
        for p, g in zip(ref.parameters(), averaged_grads(ref, big)):
            p.grad = g
        ref_opt.step()
    return dict(diff=_params_equal(model, ref), comm=comm)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("local", [True, False], ids=["no_sync", "reduce_every_micro_batch"])
def test_four_micro_batches_equal_one_big_batch(ranks, local):
    results = ranks(_accumulation_rank, 2, local)
    for r in results:
        assert r["diff"] <= 1e-6, r
    per_step = results[0]["comm"][-1]
    single = _single_reduction_bytes()
    assert per_step == (single if local else 4 * single - 3 * single // 2), (per_step, single)


def _single_reduction_bytes() -> int:
    """Bytes of one all-reduce + one broadcast of every bucket of make_net() at 2 ranks."""
    from sharded_fused_adam.core.layout import plan_buckets
    params = list(make_net().parameters())
    numels = [(i, p.numel()) for i, p in reversed(list(enumerate(params)))]
    (bucket,) = plan_buckets(numels, world_size=2, bucket_numel=25 * 2**20 // 4)
    return 2 * bucket.padded_numel * 4


class _NpuStyleScaler(torch.amp.GradScaler):
    """torch_npu's GradScaler contract (torch_npu/npu/amp/grad_scaler.py): it inherits torch's
    step(), and its update() backs off by its own ``_has_overflow`` flag."""

    _has_overflow = False

    def update(self, new_scale=None):
        if self._has_overflow:
            self._scale.mul_(self._backoff_factor)
        self._has_overflow = False
        self._per_optimizer_states.clear()


def test_a_torch_npu_style_grad_scaler_learns_about_the_overflow():
    model = make_net()
    opt = ShardedFusedAdam(model.parameters(), lr=1e-2)
    scaler = _NpuStyleScaler("cpu", init_scale=2.0**8)
    for poison in (1.0, math.inf):
        opt.zero_grad()
        scaler.scale(loss_fn(model, *batch(0, 0, same_on_all_ranks=True)) * poison).backward()
        scaler.step(opt)
        assert scaler._has_overflow == (poison == math.inf)
        scaler.update()
    assert scaler.get_scale() == 2.0**7

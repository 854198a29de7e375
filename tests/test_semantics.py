"""torch.optim.Adam semantics: the seed example, mixed dtypes, missing grads, zero_grad, closures."""
from __future__ import annotations

import copy

import pytest
import torch

from helpers import batch, loss_fn, make_net
from sharded_fused_adam import ShardedFusedAdam

# ---- the NpuFusedAdam reference page's own example, on CPU ---------------------------------


def _seed_params() -> list[torch.Tensor]:
    params = [
        torch.arange(6).reshape(2, 3).float(),
        torch.arange(12).reshape(4, 3).float(),
        torch.arange(6).reshape(2, 3).half(),
        torch.arange(12).reshape(4, 3).half(),
        torch.arange(15).reshape(5, 3).float(),
        torch.arange(18).reshape(6, 3).half(),
        torch.arange(6).reshape(2, 3).float(),
    ]
    for i, p in enumerate(params):
        if i < len(params) - 1:
            p.requires_grad = True
            p.grad = p.clone().detach() / 100.0
    return params


SEED_KWARGS = dict(eps=1e-8, betas=(0.9, 0.999), lr=2e-3, weight_decay=0.05)


def _seed_example(rank: int = 0, world_size: int = 1) -> list[torch.Tensor]:
    params = _seed_params()
    ref = [p.detach().float().requires_grad_(p.requires_grad) for p in params]
    for r, p in zip(ref, params):
        r.grad = None if p.grad is None else p.grad.float()
    opt = ShardedFusedAdam(params, **SEED_KWARGS)
    with torch.no_grad():
        opt.step()
    torch.optim.Adam(ref, fused=True, **SEED_KWARGS).step()
    # fp32 masters make fp16 params the rounding of the fp32 reference, bit for bit.
    return [bool(torch.equal(p, r.detach().to(p.dtype))) for p, r in zip(params, ref)] + [
        bool(torch.equal(params[-1], torch.arange(6).reshape(2, 3).float())),
        opt.shard_state().buckets[-1].steps,
    ]


def test_seed_example_single_process():
    *equal, untouched, _ = _seed_example()
    assert all(equal) and untouched


@pytest.mark.parametrize("world_size", [2, 3])
def test_seed_example_on_several_ranks(ranks, world_size):
    for result in ranks(_seed_example, world_size):
        assert all(result[:-1])


def test_param_without_grad_keeps_step_zero():
    params = _seed_params()
    opt = ShardedFusedAdam(params, **SEED_KWARGS)
    opt.step()
    steps = {i: int(entry["step"]) for i, entry in opt.state_dict()["state"].items()}
    assert steps == {0: 1, 1: 1, 2: 1, 3: 1, 4: 1, 5: 1}  # param 6 is frozen: no state, as in torch


# ---- mixed dtypes and missing grads on several ranks ---------------------------------------

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(7, 5), (33,), (16, 4), (3,), (128,), (2, 9)]


def _grad(step: int, i: int, rank: int, shape, *, rank_specific: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 * step + i + (1000 * rank if rank_specific else 0))
    return torch.randn(shape, generator=g)


def _manual_grads_rank(rank: int, world_size: int, mode: str, bucket_cap_mb: float = 1e-4) -> float:
    """``mode``: "mixed" (fp32/bf16/fp16, all grads), "gaps" (some params without grads at
    some steps, on every rank), "some_ranks" (param 1's grad only on rank 0 at odd steps).
    ``bucket_cap_mb=1e-4`` gives every param a bucket of its own; 25 (the default) puts all
    same-dtype params in one bucket, whose params then carry different step counts."""
    torch.manual_seed(0)
    dtypes = DTYPES if mode == "mixed" else [torch.float32] * len(SHAPES)
    ours = [torch.randn(s).to(d).requires_grad_() for s, d in zip(SHAPES, dtypes)]
    ref = [p.detach().float().requires_grad_() for p in ours]
    opt = ShardedFusedAdam(ours, lr=1e-2, weight_decay=0.01, amsgrad=True, bucket_cap_mb=bucket_cap_mb)
    if bucket_cap_mb >= 1:
        assert len(opt.shard_state().buckets) == len(set(dtypes)), "the params must share buckets"
    ref_opt = torch.optim.Adam(ref, lr=1e-2, weight_decay=0.01, amsgrad=True, fused=True)
    worst = 0.0
    for step in range(5):
        for i, (p, r) in enumerate(zip(ours, ref)):
            g = _grad(step, i, rank, p.shape, rank_specific=False).to(p.dtype)
            absent = mode == "gaps" and (i + step) % 3 == 0
            partial = mode == "some_ranks" and i == 1 and step % 2 == 1
            p.grad = None if absent or (partial and rank != 0) else g
            r.grad = None if absent else (g.float() / world_size if partial else g.float())
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
        for p, r in zip(ours, ref):
            worst = max(worst, (p.float() - r.detach().to(p.dtype).float()).abs().max().item())
    return worst


@pytest.mark.parametrize("mode", ["mixed", "gaps", "some_ranks"])
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_manual_grads_are_bitwise_equal(ranks, world_size, mode):
    assert ranks(_manual_grads_rank, world_size, mode) == [0.0] * world_size


@pytest.mark.parametrize("mode", ["gaps", "some_ranks", "mixed"])
@pytest.mark.parametrize("world_size", [1, 2])
def test_params_sharing_a_bucket_keep_their_own_step_counts(ranks, world_size, mode):
    # One bucket (per dtype): a param that missed a gradient while its bucket-mates got one
    # must reach the kernel with its own step count (bias correction), not the bucket's.
    assert ranks(_manual_grads_rank, world_size, mode, 25.0) == [0.0] * world_size


# ---- single process: torch semantics ------------------------------------------------------


def _pair(**kwargs):
    model = make_net()
    ref = copy.deepcopy(model)
    return model, ShardedFusedAdam(model.parameters(), **kwargs), ref, torch.optim.Adam(
        ref.parameters(), fused=True, **kwargs)


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_gradients_move_into_the_optimizer_during_backward():
    model, opt, ref, _ = _pair(lr=1e-2)
    loss_fn(model, *batch(0, 0, same_on_all_ranks=True)).backward()
    assert all(p.grad is None for p in model.parameters())
    norm = opt.clip_grad_norm_(1e9)
    loss_fn(ref, *batch(0, 0, same_on_all_ranks=True)).backward()
    expected = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ref.parameters() if p.grad is not None]))
    torch.testing.assert_close(norm, expected)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_matches_torch(set_to_none):
    model, opt, ref, ref_opt = _pair(lr=1e-2, weight_decay=0.1)
    for step in range(4):
        for m, o in ((model, opt), (ref, ref_opt)):
            if step != 2:  # step 2: no backward, so zero_grad decides what the step sees
                loss_fn(m, *batch(step, 0, same_on_all_ranks=True)).backward()
            if o is opt and step == 2 and set_to_none:  # no gradient anywhere: said out loud
                with pytest.warns(RuntimeWarning, match="found no gradient for any parameter"):
                    o.step()
            else:
                o.step()
            o.zero_grad(set_to_none=set_to_none)
        assert _same(model, ref), step


def test_step_twice_without_new_gradients_reuses_them_like_torch():
    model, opt, ref, ref_opt = _pair(lr=1e-2)
    for m, o in ((model, opt), (ref, ref_opt)):
        loss_fn(m, *batch(0, 0, same_on_all_ranks=True)).backward()
        o.step()
        o.step()
    assert _same(model, ref)


def test_closure_is_called_with_grad_enabled_and_its_loss_returned():
    model, opt, ref, ref_opt = _pair(lr=1e-2)
    data = batch(0, 0, same_on_all_ranks=True)

    def closure_for(m, o):
        def closure():
            o.zero_grad()
            loss = loss_fn(m, *data)
            loss.backward()
            return loss
        return closure

    assert torch.equal(opt.step(closure_for(model, opt)), ref_opt.step(closure_for(ref, ref_opt)))
    assert _same(model, ref)


def test_added_param_group_trains_like_torch():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(5, 4), torch.nn.Linear(4, 3)
    a_ref, b_ref = copy.deepcopy(a), copy.deepcopy(b)
    opt = ShardedFusedAdam(a.parameters(), lr=1e-2)
    ref_opt = torch.optim.Adam(a_ref.parameters(), lr=1e-2, fused=True)
    for step in range(4):
        if step == 2:
            opt.add_param_group({"params": list(b.parameters()), "lr": 3e-2})
            ref_opt.add_param_group({"params": list(b_ref.parameters()), "lr": 3e-2})
        x = torch.randn(2, 5, generator=torch.Generator().manual_seed(step))
        for (m1, m2, o) in ((a, b, opt), (a_ref, b_ref, ref_opt)):
            o.zero_grad()
            m2(m1(x)).sum().backward()
            if step < 2:
                for p in m2.parameters():
                    p.grad = None
            o.step()
        assert all(torch.equal(x, y) for x, y in zip([*a.parameters(), *b.parameters()],
                                                     [*a_ref.parameters(), *b_ref.parameters()]))


def test_lr_scheduler_sees_real_param_groups():
    model, opt, ref, ref_opt = _pair(lr=1e-2)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in (opt, ref_opt)]
    for step in range(3):
        for m, o, s in ((model, opt, scheds[0]), (ref, ref_opt, scheds[1])):
            o.zero_grad()
            loss_fn(m, *batch(step, 0, same_on_all_ranks=True)).backward()
            o.step()
            s.step()
    assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"] == 1e-2 / 8
    assert _same(model, ref)

"""Training-loop idioms against torch.optim.AdamW(fused=True) in the same loop, on 2 and 3 gloo ranks.

The reference model sees the mean of every rank's loss (so its gradient is the average the
ranks reduce to) and goes through exactly the same zeroing/clipping idiom. Same values,
different summation order: tolerance 2e-6 over a few steps (the bugs these rows pin cost 1e-2).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

from helpers import batch, loss_fn, make_net
from sharded_fused_adam import ShardedFusedAdamW, clip_grad_norm_, clip_grad_value_

TOL = 2e-6
KW = dict(lr=1e-2, weight_decay=0.1)


def _ref_backward(ref: nn.Module, step: int, world_size: int, micro: int = 0) -> None:
    batches = [batch(100 * step + micro, r, same_on_all_ranks=False) for r in range(world_size)]
    (sum(loss_fn(ref, *b) for b in batches) / world_size).backward()


def _backward(model: nn.Module, step: int, rank: int, micro: int = 0) -> None:
    loss_fn(model, *batch(100 * step + micro, rank, same_on_all_ranks=False)).backward()


def _diff(a: nn.Module, b: nn.Module) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.parameters(), b.parameters()))


def _loop(rank: int, world_size: int, idiom: str, grads: str = "sharded") -> float:
    model = make_net()
    ref = copy.deepcopy(model)
    opt = ShardedFusedAdamW(model.parameters(), grads=grads, **KW)
    ref_opt = torch.optim.AdamW(ref.parameters(), fused=True, **KW)
    worst = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the no-gradient case says so; not the point here
        for step in range(4):
            for m, o, bwd in ((model, opt, lambda mi=0: _backward(model, step, rank, mi)),
                              (ref, ref_opt, lambda mi=0: _ref_backward(ref, step, world_size, mi))):
                _IDIOMS[idiom](m, o, bwd, step)
            worst = max(worst, _diff(model, ref))
    return worst


def _model_zero_grad(m, o, bwd, step):
    bwd()
    o.step()
    m.zero_grad()


def _zero_keep(m, o, bwd, step):
    bwd()
    o.step()
    o.zero_grad(set_to_none=False)


def _zero_before_backward(m, o, bwd, step):
    o.zero_grad()
    bwd()
    o.step()


def _accumulate(m, o, bwd, step):
    m.zero_grad()
    for micro in range(3):
        bwd(micro)
    o.step()


def _accumulate_no_sync(m, o, bwd, step):
    m.zero_grad()
    for micro in range(3):
        if micro < 2 and hasattr(o, "no_sync"):  # the last micro-batch reduces the sum once
            with o.no_sync():
                bwd(micro)
        else:
            bwd(micro)
    o.step()


def _never_zero(m, o, bwd, step):
    bwd()
    o.step()


def _two_steps(m, o, bwd, step):
    m.zero_grad()
    bwd()
    o.step()
    o.step()


def _hand_set(m, o, bwd, step):
    # p.grad = g by hand each step, never zeroed: torch replaces the gradient
    for p in m.parameters():
        p.grad = torch.full_like(p, 0.01 * (step + 1))
    o.step()


def _drop_some(m, o, bwd, step):
    # param.grad = None on every other param after the step, the rest never zeroed: in one
    # bucket, only the dropped params' shard pieces are forgotten, the others keep accumulating
    bwd()
    o.step()
    for i, p in enumerate(m.parameters()):
        if i % 2:
            p.grad = None


def _torch_clip_replicated(m, o, bwd, step):
    bwd()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 0.05)
    torch.nn.utils.clip_grad_value_(m.parameters(), 0.004)
    o.step()
    m.zero_grad()


def _drop_in_clip(m, o, bwd, step):
    bwd()
    if isinstance(o, torch.optim.AdamW):
        torch.nn.utils.clip_grad_norm_(m.parameters(), 0.05)
        torch.nn.utils.clip_grad_value_(m.parameters(), 0.004)
    else:
        clip_grad_norm_(m.parameters(), 0.05)
        clip_grad_value_(m.parameters(), 0.004)
    o.step()
    m.zero_grad()


_IDIOMS = {f.__name__[1:]: f for f in (_model_zero_grad, _zero_keep, _zero_before_backward, _accumulate,
                                        _accumulate_no_sync, _never_zero, _two_steps, _hand_set,
                                        _drop_some, _drop_in_clip, _torch_clip_replicated)}


@pytest.mark.parametrize("idiom", sorted(set(_IDIOMS) - {"torch_clip_replicated"}))
@pytest.mark.parametrize("world_size", [2, 3])
def test_zeroing_and_accumulation_idioms_match_torch(ranks, world_size, idiom):
    assert max(ranks(_loop, world_size, idiom)) < TOL


def test_replicated_gradients_work_with_torch_clipping(ranks):
    for world_size in (2, 3):
        assert max(ranks(_loop, world_size, "torch_clip_replicated", "replicated")) < TOL


@pytest.mark.parametrize("idiom", ["model_zero_grad", "zero_keep", "never_zero", "accumulate_no_sync", "hand_set"])
def test_replicated_gradients_follow_torch_zeroing(ranks, idiom):
    assert max(ranks(_loop, 2, idiom, "replicated")) < TOL


# ---- param.grad is readable (replicated) and reading it in sharded mode is loud -------------

def _read_grads(rank: int, world_size: int, grads: str) -> tuple[float, list[str]]:
    model = make_net()
    ref = copy.deepcopy(model)
    opt = ShardedFusedAdamW(model.parameters(), grads=grads, **KW)
    _backward(model, 0, rank)
    _ref_backward(ref, 0, world_size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
        opt.step()
    expected = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1e9)
    return abs(norm.item() - expected.item()), [str(w.message) for w in caught]


def test_torch_clip_in_sharded_mode_warns_and_replicated_mode_is_exact(ranks):
    gap, messages = ranks(_read_grads, 2, "sharded")[0]
    assert any("param.grad was read between backward and step() and was None" in m for m in messages)
    assert any("grads='replicated'" in m and "clip_grad_norm_" in m for m in messages)
    gap, messages = ranks(_read_grads, 2, "replicated")[0]
    assert gap < 1e-6 and not any("param.grad was read" in m for m in messages)


# ---- DDP-wrapped models ----------------------------------------------------------------------

def _ddp(rank: int, world_size: int, grads: str) -> tuple[float, dict]:
    model = make_net()
    ref = copy.deepcopy(model)
    opt = ShardedFusedAdamW(model.parameters(), grads=grads, **KW)
    wrapped = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)  # OddNet.unused
    ref_opt = torch.optim.AdamW(ref.parameters(), fused=True, **KW)
    worst, traffic = 0.0, {}
    for step in range(3):
        loss_fn(wrapped, *batch(100 * step, rank, same_on_all_ranks=False)).backward()
        torch.nn.utils.clip_grad_norm_(wrapped.parameters(), 0.05)  # DDP's grads are real: torch-exact
        opt.step()
        traffic = dict(opt.last_step_comm_bytes)
        opt.zero_grad()
        _ref_backward(ref, step, world_size)
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        ref_opt.step()
        ref_opt.zero_grad()
        worst = max(worst, _diff(model, ref))
    return worst, traffic


@pytest.mark.parametrize("world_size", [2, 3])
def test_a_ddp_wrapped_model_is_reduced_once(ranks, world_size):
    for worst, traffic in ranks(_ddp, world_size, "sharded"):
        assert worst < TOL
        assert "all_reduce" not in traffic and "reduce_scatter" not in traffic, traffic  # no second reduction


# ---- frozen params ---------------------------------------------------------------------------

def _frozen(rank: int, world_size: int) -> dict:
    model = make_net()
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith("head")  # most of the model frozen, as in PEFT
    ref = copy.deepcopy(model)
    opt = ShardedFusedAdamW(model.parameters(), **KW)
    ref_opt = torch.optim.AdamW(ref.parameters(), fused=True, **KW)
    out = {"report": opt.memory_report().as_dict(), "worst": 0.0}
    for step in range(4):
        if step == 2:  # unfreezing joins at the next step, as in torch
            model.fc2.weight.requires_grad_(True)
            ref.fc2.weight.requires_grad_(True)
        for m, o, bwd in ((model, opt, lambda: _backward(model, step, rank)),
                          (ref, ref_opt, lambda: _ref_backward(ref, step, world_size))):
            bwd()
            o.step()
            o.zero_grad()
        out.setdefault("traffic", dict(opt.last_step_comm_bytes))
        out["worst"] = max(out["worst"], _diff(model, ref))
    out["state_keys"] = sorted(opt.state_dict()["state"])
    return out


def test_frozen_params_cost_nothing_and_unfreezing_joins(ranks):
    head = 16 * 5 + 5
    for out in ranks(_frozen, 2):
        assert out["worst"] < TOL
        assert out["report"]["num_params"] == head
        assert out["report"]["moments"] <= 2 * 4 * (head // 2 + 16)  # a shard of the head only
        assert sum(out["traffic"].values()) <= 2 * 4 * (head + 32)  # gradients + params of the head only
        assert len(out["state_keys"]) == 3  # head.weight, head.bias, fc2.weight


# ---- start-up order, rank agreement ---------------------------------------------------------

def test_building_before_init_process_group_in_a_multi_rank_launch_raises(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="init_distributed"):
        ShardedFusedAdamW(make_net().parameters())


def _differently_seeded(rank: int, world_size: int) -> list[torch.Tensor]:
    model = make_net(seed=rank)
    ShardedFusedAdamW(model.parameters())
    return [p.detach().clone() for p in model.parameters()]


def test_rank_zero_params_are_broadcast_at_construction(ranks):
    results = ranks(_differently_seeded, 3)
    expected = [p.detach() for p in make_net(seed=0).parameters()]
    for params in results:
        assert all(torch.equal(a, b) for a, b in zip(params, expected))


def _mismatched(rank: int, world_size: int, case: str) -> str:
    model = make_net()
    params = list(model.parameters())
    if rank == world_size - 1:
        if case == "extra_param":
            params.append(nn.Parameter(torch.zeros(4)))
        elif case == "other_shape":
            params[0] = nn.Parameter(torch.zeros(38, 13))
        elif case == "same_numel_other_shape":
            params[0] = nn.Parameter(torch.zeros(13, 37))
        elif case == "hidden_by_padding":
            params[-1] = nn.Parameter(torch.zeros(2))  # 3 -> 2 elements: same padded size
        elif case == "reordered":
            params[1], params[2] = params[2], params[1]
        elif case == "frozen_here_only":
            params[3].requires_grad_(False)
    try:
        ShardedFusedAdamW(params, collective_timeout=30)
    except ValueError as exc:
        return str(exc)
    return "no error"


@pytest.mark.parametrize("case", ["extra_param", "other_shape", "same_numel_other_shape", "hidden_by_padding",
                                  "reordered", "frozen_here_only"])
def test_ranks_that_build_different_models_all_raise(ranks, case):
    for message in ranks(_mismatched, 3, case):
        assert "rank(s) [2] differ from rank 0" in message, message


# ---- state_dict() on one rank ----------------------------------------------------------------

def _rank0_state_dict(rank: int, world_size: int) -> dict:
    model = make_net()
    opt = ShardedFusedAdamW(model.parameters(), state_dict_timeout=20, collective_timeout=30)
    _backward(model, 0, rank)
    opt.step()
    out = {}
    if rank == 0:  # the Trainer's save: only the saving rank asks (served: tests/test_rank0_state_dict.py)
        out["alone"] = sorted(opt.state_dict()["state"])
    dist.barrier()
    opt.snapshot_state_dict()  # every rank; afterwards one rank alone gets it without asking
    if rank == 0:
        out["keys"] = sorted(opt.state_dict()["state"])
    full = opt.state_dict()  # the every-rank pattern still works
    out["same"] = rank != 0 or sorted(full["state"]) == out["keys"] == out["alone"]
    return out


def test_state_dict_on_one_rank_alone(ranks):
    results = ranks(_rank0_state_dict, 3, timeout_s=90)
    assert results[0]["keys"] and all(r["same"] for r in results)


# ---- skipped steps, empty params ---------------------------------------------------------------

def test_a_skipped_step_without_a_scaler_warns():
    model = make_net()
    opt = ShardedFusedAdamW(model.parameters())
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    with pytest.warns(RuntimeWarning, match="step\\(\\) skipped: a gradient on some rank is inf or NaN"):
        opt.step()
    assert opt.overflow


def test_zero_element_params_are_accepted_like_torch():
    model = make_net()
    ref = copy.deepcopy(model)
    empty, ref_empty = nn.Parameter(torch.zeros(0, 4)), nn.Parameter(torch.zeros(0, 4))
    opt = ShardedFusedAdamW([*model.parameters(), empty], **KW)
    ref_opt = torch.optim.AdamW([*ref.parameters(), ref_empty], fused=True, **KW)
    for step in range(3):
        for m, o in ((model, opt), (ref, ref_opt)):
            _backward(m, step, 0)
            o.step()
            o.zero_grad()
    assert _diff(model, ref) == 0.0


def test_options_are_validated_and_unknown_ones_named():
    with pytest.raises(TypeError, match="unexpected keyword argument.*'bucket_size'"):
        ShardedFusedAdamW(make_net().parameters(), bucket_size=4)
    with pytest.raises(ValueError, match="grads must be one of"):
        ShardedFusedAdamW(make_net().parameters(), grads="local")


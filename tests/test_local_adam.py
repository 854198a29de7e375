"""FusedAdam: torch.optim.Adam's semantics and state layout, bit for bit, on one process."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sharded_fused_adam.local_adam import FusedAdam


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(13, 29), nn.LayerNorm(29), nn.GELU(), nn.Linear(29, 5), nn.Linear(3, 3))


def _loss(model: nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(8, 13, generator=g), torch.randn(8, 5, generator=g)
    return nn.functional.mse_loss(model[:4](x), y)  # the last Linear never gets a gradient


def _groups(model: nn.Module) -> list[dict]:
    weights = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2]
    others = [p for n, p in model.named_parameters() if not (n.endswith("weight") and p.dim() == 2)]
    return [{"params": weights, "weight_decay": 0.05}, {"params": others, "lr": 3e-3, "weight_decay": 0.0}]


def _train_side_by_side(ours_kwargs: dict, torch_cls: type, torch_kwargs: dict, steps: int = 6) -> float:
    model = _net()
    ref = copy.deepcopy(model)
    opt = FusedAdam(_groups(model), **ours_kwargs)
    ref_opt = torch_cls(_groups(ref), **torch_kwargs)
    sched = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (opt, ref_opt)]
    worst = 0.0
    for step in range(steps):
        for m, o, s in ((model, opt, sched[0]), (ref, ref_opt, sched[1])):
            o.zero_grad()
            _loss(m, step).backward()
            o.step()
            s.step()
        for a, b in zip(model.parameters(), ref.parameters()):
            worst = max(worst, (a - b).abs().max().item())
    for (_, ours), (_, theirs) in zip(opt.state.items(), ref_opt.state.items()):
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert torch.equal(ours[key].cpu(), theirs[key].cpu()), key
    return worst


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("adamw", [False, True])
def test_bitwise_equal_to_torch_fused(adamw: bool, amsgrad: bool):
    torch_cls = torch.optim.AdamW if adamw else torch.optim.Adam
    worst = _train_side_by_side(dict(lr=1e-2, weight_decay=0.01, amsgrad=amsgrad, adamw=adamw), torch_cls,
                                dict(lr=1e-2, weight_decay=0.01, amsgrad=amsgrad, fused=True))
    assert worst == 0.0


@pytest.mark.parametrize("kernel", ["torch_fused", "reference"])
def test_maximize_bitwise_equal_to_torch(kernel: str):
    impl = dict(fused=True) if kernel == "torch_fused" else dict(foreach=False)
    worst = _train_side_by_side(dict(lr=1e-2, weight_decay=0.01, maximize=True, kernel=kernel), torch.optim.Adam,
                                dict(lr=1e-2, weight_decay=0.01, maximize=True, **impl))
    assert worst == 0.0


def test_reference_kernel_bitwise_equal_to_torch_single_tensor():
    worst = _train_side_by_side(dict(lr=1e-2, weight_decay=0.01, kernel="reference"), torch.optim.Adam,
                                dict(lr=1e-2, weight_decay=0.01, foreach=False))
    assert worst == 0.0


def test_param_without_grad_keeps_no_state():
    model = _net()
    opt = FusedAdam(model.parameters(), lr=1e-2)
    before = model[4].weight.detach().clone()
    for step in range(3):
        opt.zero_grad()
        _loss(model, step).backward()
        opt.step()
    assert model[4].weight not in opt.state and torch.equal(model[4].weight, before)
    assert opt.state[model[0].weight]["step"].item() == 3.0


def test_state_dict_moves_between_torch_adam_and_fused_adam():
    model = _net()
    torch_opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    for step in range(2):
        torch_opt.zero_grad()
        _loss(model, step).backward()
        torch_opt.step()
    ours_model = copy.deepcopy(model)
    ours = FusedAdam(ours_model.parameters(), lr=0.5)
    ours.load_state_dict(copy.deepcopy(torch_opt.state_dict()))  # torch's loader may share tensors
    assert ours.param_groups[0]["lr"] == 1e-2
    for m, o in ((model, torch_opt), (ours_model, ours)):
        o.zero_grad()
        _loss(m, 2).backward()
        o.step()
    for a, b in zip(model.parameters(), ours_model.parameters()):
        assert torch.equal(a, b)
    back = torch.optim.Adam(copy.deepcopy(ours_model).parameters(), fused=True)
    back.load_state_dict(copy.deepcopy(ours.state_dict()))
    assert [s["step"].item() for s in back.state.values()] == [3.0] * 6


def test_maximize_comes_back_from_a_torch_state_dict_and_defaults_for_older_dicts():
    model = _net()
    torch_opt = torch.optim.Adam(model.parameters(), lr=1e-2, maximize=True, fused=True)
    ours_model = copy.deepcopy(model)
    ours = FusedAdam(ours_model.parameters())
    ours.load_state_dict(copy.deepcopy(torch_opt.state_dict()))
    assert ours.param_groups[0]["maximize"] is True
    older = copy.deepcopy(torch_opt.state_dict())
    del older["param_groups"][0]["maximize"]
    ours.load_state_dict(older)
    assert ours.param_groups[0]["maximize"] is False
    _loss(ours_model, 0).backward()
    ours.step()  # reads the group's maximize


def test_non_contiguous_param_is_updated_in_place():
    base = torch.randn(5, 7)
    p = nn.Parameter(base.t())  # strided, not contiguous
    q = nn.Parameter(base.t().contiguous())
    ours, ref = FusedAdam([p], lr=0.1), torch.optim.Adam([q], lr=0.1, fused=True)
    for _ in range(2):
        for t, o in ((p, ours), (q, ref)):
            o.zero_grad()
            (t.sin().sum()).backward()
            o.step()
    assert not p.is_contiguous() and torch.equal(p, q)


def test_deepspeed_style_param_swap_and_single_group_steps():
    """DeepSpeed ZeRO-1/2 replaces each group's params with one flat partition and steps one
    group at a time (see [Note: delegated mode]); state must follow the new tensors."""
    model = _net()
    opt = FusedAdam(_groups(model), lr=1e-2)
    flats = [torch.cat([p.detach().reshape(-1) for p in g["params"]]) for g in opt.param_groups]
    refs = [f.clone() for f in flats]
    hyper = [{k: v for k, v in g.items() if k not in ("params", "decoupled_weight_decay")} for g in opt.param_groups]
    ref_opt = torch.optim.Adam([{"params": [r], **h} for r, h in zip(refs, hyper)], fused=True)
    for g, f in zip(opt.param_groups, flats):
        g["params"] = [f]
    for step in range(3):
        for i, (f, r) in enumerate(zip(flats, refs)):
            f.grad = torch.full_like(f, 0.1 * (step + 1) * (i + 1))
            r.grad = f.grad.clone()
        all_groups = opt.param_groups
        for group in all_groups:
            opt.param_groups = [group]
            opt.step()
        opt.param_groups = all_groups
        ref_opt.step()
    for f, r in zip(flats, refs):
        assert torch.equal(f, r)
        assert opt.state[f]["step"].item() == 3.0


@pytest.mark.parametrize("kwargs, exc, fragment", [
    (dict(lr=-1.0), ValueError, "lr must be >= 0, got -1.0"),
    (dict(betas=(0.9, 1.0)), ValueError, "betas[1] must be in [0, 1), got 1.0"),
    (dict(eps=-1e-8), ValueError, "eps must be >= 0"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay must be >= 0"),
    (dict(kernel="cuda_magic"), ValueError, "kernel must be one of"),
    (dict(amsgrad=1), TypeError, "amsgrad must be a bool"),
])
def test_bad_arguments(kwargs: dict, exc: type, fragment: str):
    with pytest.raises(exc) as info:
        FusedAdam(_net().parameters(), **kwargs)
    assert fragment in str(info.value)


def test_bad_param_group_is_not_added():
    model = _net()
    opt = FusedAdam(list(model[0].parameters()))
    with pytest.raises(ValueError, match="lr must be >= 0"):
        opt.add_param_group({"params": list(model[3].parameters()), "lr": -1.0})
    assert len(opt.param_groups) == 1

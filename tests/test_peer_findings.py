"""What torch's own ZeroRedundancyOptimizer tests, ported, found: rebuilding an optimizer over a
model after the first is gone, two live optimizers over one param, torch's ``param_groups``
keys. (``Join`` with uneven inputs: tests/test_join.py.)

Oracle: single-process ``torch.optim.Adam/AdamW(fused=True)`` on the same gradients,
bitwise (one process, identical arithmetic).
"""
from __future__ import annotations

import copy
import gc

import pytest
import torch
from torch import nn

from helpers import batch, loss_fn, make_net
from sharded_fused_adam import ShardedFusedAdam, ShardedFusedAdamW, load_sharded, save_sharded


def _train_beside_torch(model: nn.Module, opt: torch.optim.Optimizer, ref: nn.Module,
                        ref_opt: torch.optim.Optimizer, steps: range) -> float:
    worst = 0.0
    for step in steps:
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            loss_fn(m, *batch(step, 0, same_on_all_ranks=True)).backward()
            o.step()
        worst = max(worst, max((a - b).abs().max().item() for a, b in zip(model.parameters(), ref.parameters())))
    return worst


# ---- rebuilding, and two live optimizers --------------------------------------------------
def test_an_optimizer_rebuilt_after_the_first_is_gone_trains_like_torch():
    model = make_net()
    first = ShardedFusedAdam(model.parameters(), lr=1e-2)
    _train_beside_torch(model, first, copy.deepcopy(model), torch.optim.Adam(make_net().parameters()), range(1))
    in_first = [p.data_ptr() for p in model.parameters()]
    del first
    gc.collect()
    # The params still live in the first optimizer's flat buffers (each through a storage of its
    # own over that memory, see [Note: one storage per param]): disjoint ranges of one allocation.
    assert [p.data_ptr() for p in model.parameters()] == in_first
    ref = copy.deepcopy(model)
    second = ShardedFusedAdam(model.parameters(), lr=1e-2)
    worst = _train_beside_torch(model, second, ref, torch.optim.Adam(ref.parameters(), lr=1e-2, fused=True),
                                range(1, 4))
    assert worst == 0.0


def test_two_live_optimizers_over_one_param_are_an_error_naming_both():
    model = make_net()
    ref = copy.deepcopy(model)
    first = ShardedFusedAdam(model.named_parameters(), lr=1e-2)
    pointers = [p.data_ptr() for p in model.parameters()]
    with pytest.raises(ValueError) as info:
        ShardedFusedAdam(model.named_parameters(), lr=1e-2)
    message = str(info.value)
    assert f"param 'emb.weight' is already sharded by another live ShardedFusedAdam (object at {id(first):#x}, " \
           f"{len(list(model.parameters()))} params in 1 param groups)" in message, message
    assert "del opt; gc.collect()" in message
    # The refused optimizer touched nothing: the first one still trains like torch.
    assert [p.data_ptr() for p in model.parameters()] == pointers
    worst = _train_beside_torch(model, first, ref, torch.optim.Adam(ref.parameters(), lr=1e-2, fused=True), range(3))
    assert worst == 0.0


def test_live_optimizers_over_separate_params_of_one_model_are_fine():
    model = make_net()
    live = [ShardedFusedAdam(model.fc1.parameters()), ShardedFusedAdam(model.fc2.parameters())]
    with pytest.raises(ValueError, match=r"param 1 \(group 0, shape \(29,\), torch.float32\) is already sharded"):
        ShardedFusedAdam([model.head.weight, model.fc1.bias])
    assert all(o.param_groups for o in live)


def test_disjoint_views_of_one_storage_are_params_like_any_other():
    base = torch.randn(52)  # a transposed (non-contiguous) view beside two plain ones
    params = [nn.Parameter(base[:16].view(4, 4)), nn.Parameter(base[16:28].view(3, 4).t()), nn.Parameter(base[28:])]
    # Contiguous references: torch 2.13's CPU fused Adam pairs a transposed param with a contiguous
    # grad element by element in memory order (0.05 off torch's own foreach=False after 3 steps).
    refs = [nn.Parameter(p.detach().clone(memory_format=torch.contiguous_format)) for p in params]
    opt = ShardedFusedAdam(params, lr=1e-2)
    ref_opt = torch.optim.Adam(refs, lr=1e-2, fused=True)
    for step in range(3):
        grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(step * 10 + i)) for i, p in
                 enumerate(params)]
        for group, o in ((params, opt), (refs, ref_opt)):
            for p, g in zip(group, grads):
                p.grad = g.clone()
            o.step()
    assert all(torch.equal(a, b) for a, b in zip(params, refs))


@pytest.mark.parametrize("make", [
    lambda base: [base[:6], base[4:]],                     # overlapping ranges
    lambda base: [base[0:20:2], base[10:12]],              # a strided span containing another view
    lambda base: [base.view(4, 5).t(), base[19:]],         # a transposed view and its last element
], ids=["overlap", "inside_stride", "transposed"])
def test_params_overlapping_in_memory_are_refused(make):
    base = torch.randn(20)
    with pytest.raises(ValueError, match=r"param 1 .* overlaps the memory range of param 0"):
        ShardedFusedAdam(make(base))


# ---- param_groups carry torch's keys -----------------------------------------------------
@pytest.mark.parametrize("ours_cls, torch_cls", [(ShardedFusedAdam, torch.optim.Adam),
                                                 (ShardedFusedAdamW, torch.optim.AdamW)])
@pytest.mark.parametrize("kernel, fused", [(None, True), ("reference", None)])
def test_param_groups_have_torch_keys_and_values(ours_cls, torch_cls, kernel, fused):
    model = make_net()
    theirs = torch_cls(make_net().parameters()).param_groups[0]
    opt = ours_cls(model.fc1.parameters(), kernel=kernel)
    opt.add_param_group({"params": list(model.fc2.parameters()), "foreach": False})
    for group in opt.param_groups:
        assert set(theirs) <= set(group), sorted(set(theirs) - set(group))
        expected = {**{k: v for k, v in theirs.items() if k != "params"}, "fused": fused}
        if group is opt.param_groups[1]:
            expected["foreach"] = False  # what the group was given, as torch keeps it
        assert {k: group[k] for k in expected} == expected
    saved = opt.state_dict()
    saved["param_groups"][0].update(fused=False, foreach=True)  # how torch ran: never loaded
    opt.load_state_dict(saved)
    assert (opt.param_groups[0]["fused"], opt.param_groups[0]["foreach"]) == (fused, None)


def test_param_groups_keep_torch_keys_through_a_sharded_load(tmp_path):
    model = make_net()
    opt = ShardedFusedAdam(model.parameters(), lr=1e-2)
    loss_fn(model, *batch(0, 0, same_on_all_ranks=True)).backward()
    opt.step()
    save_sharded(opt, tmp_path / "ckpt")
    load_sharded(opt, tmp_path / "ckpt")
    group = opt.param_groups[0]
    assert (group["fused"], group["foreach"], group["capturable"], group["differentiable"]) == (True, None, False, False)


"""The clip drop-ins (numerics/clip.py): which optimizer owns a param, and the inputs they refuse.

Single process (a one-rank optimizer); the multi-rank results are pinned in test_idioms.py.
"""
from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from sharded_fused_adam import ShardedFusedAdam, clip_grad_norm_, clip_grad_value_
from sharded_fused_adam.numerics.clip import owner_of


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def _backward(model: nn.Module) -> None:
    model(torch.linspace(-1, 1, 12).reshape(3, 4)).pow(2).sum().backward()


def test_owner_is_the_live_sharded_optimizer_only():
    sharded, replicated, free = _model(), _model(), _model()
    opt = ShardedFusedAdam(sharded.parameters())
    rep = ShardedFusedAdam(replicated.parameters(), grads="replicated")
    assert all(owner_of(p) is opt for p in sharded.parameters())
    assert all(owner_of(p) is None for p in [*replicated.parameters(), *free.parameters()])
    del opt
    gc.collect()
    assert all(owner_of(p) is None for p in sharded.parameters()) and rep.param_groups


def test_replicated_and_unowned_params_go_to_torch_bitwise():
    for grads in ("replicated", None):
        model, ref = _model(), _model()
        if grads:
            opt = ShardedFusedAdam(model.parameters(), grads=grads)
            assert opt.param_groups
        _backward(model)
        _backward(ref)
        norm = clip_grad_norm_(model.parameters(), 0.1)
        assert torch.equal(norm, torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1))
        clip_grad_value_(model.parameters(), 1e-3)
        torch.nn.utils.clip_grad_value_(ref.parameters(), 1e-3)
        assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), ref.parameters()))


BAD = [
    ("two optimizers", lambda a, b, free: [*a.parameters(), *b.parameters()], ValueError, "several ShardedFusedAdam"),
    ("only some params", lambda a, b, free: list(a.parameters())[:2], ValueError, "only some of the trainable"),
    ("param.grad beside shards", lambda a, b, free: [*a.parameters(), *free.parameters()], ValueError,
     "param.grad beside"),
]


@pytest.mark.parametrize("case,params,error,fragment", BAD, ids=[b[0] for b in BAD])
def test_mixed_inputs_are_refused(case, params, error, fragment):
    a, b, free = _model(0), _model(1), _model(2)
    opts = [ShardedFusedAdam(a.parameters()), ShardedFusedAdam(b.parameters())]
    for m in (a, b, free):
        _backward(m)
    with pytest.raises(error, match=fragment):
        clip_grad_norm_(params(a, b, free), 1.0)
    assert len(opts) == 2


def test_error_if_nonfinite_is_torchs_rule():
    model = _model()
    opt = ShardedFusedAdam(model.parameters())
    model(torch.full((1, 4), float("inf"))).sum().backward()
    with pytest.raises(RuntimeError, match="non-finite"):
        clip_grad_norm_(model.parameters(), 1.0, error_if_nonfinite=True)
    assert opt.param_groups

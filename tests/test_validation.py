"""Bad input: a clear exception naming what was wrong, and nothing touched."""
from __future__ import annotations

import warnings

import pytest
import torch

from sharded_fused_adam import ShardedFusedAdam, ShardedFusedAdamW


def _p(*shape, dtype=torch.float32):
    return torch.nn.Parameter(torch.randn(*shape, dtype=dtype))


W = _p(3, 4)

BAD_HYPERPARAMETERS = [
    (dict(lr=-1e-3), ValueError, "lr must be >= 0, got -0.001"),
    (dict(eps=-1e-8), ValueError, "eps must be >= 0, got -1e-08"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay must be >= 0, got -0.1"),
    (dict(betas=(1.0, 0.999)), ValueError, r"betas\[0\] must be in \[0, 1\), got 1.0"),
    (dict(betas=(0.9, -0.5)), ValueError, r"betas\[1\] must be in \[0, 1\), got -0.5"),
    (dict(betas=(0.9,)), TypeError, "betas must be a pair of floats"),
    (dict(lr="0.1"), TypeError, "lr must be a real number, got str"),
    (dict(lr=float("nan")), ValueError, "lr must be finite, got nan"),
    (dict(eps=float("inf")), ValueError, "eps must be finite, got inf"),
    (dict(amsgrad="yes"), TypeError, "amsgrad must be a bool"),
    (dict(bucket_cap_mb=0), ValueError, "bucket_cap_mb must be > 0, got 0"),
    (dict(max_grad_norm=-1.0), ValueError, "max_grad_norm must be > 0 or None, got -1.0"),
    (dict(reduce_dtype=torch.int32), ValueError, "reduce_dtype must be"),
    (dict(comm="nccl"), ValueError, "comm must be one of .* got 'nccl'"),
    (dict(master_weights="bf16"), ValueError, r"master_weights must be one of \('auto', 'fp32', 'split'\), got 'bf16'"),
    (dict(state_dtype=torch.float16), ValueError,
     "state_dtype must be None, torch.float32 or torch.bfloat16, got torch.float16"),
    (dict(kernel="apex"), ValueError, "kernel must be one of .* got 'apex'"),
    (dict(loss_scale="static"), ValueError, "loss_scale must be a number, 'dynamic'"),
    (dict(loss_scale=-4.0), ValueError, "loss scale must be a positive finite number, got -4.0"),
    (dict(loss_scale=[1]), TypeError, "loss_scale must be .* got list"),
    # torch.optim.Adam's keywords (see [Note: torch's implementation flags])
    (dict(lr=torch.tensor([1e-3, 1e-3])), ValueError, r"Tensor lr must be 1-element, got shape \(2,\)"),
    (dict(betas=(torch.tensor([0.9, 0.9]), torch.tensor(0.99))), ValueError, r"Tensor betas\[0\] must be 1-element"),
    (dict(betas=(0.9, torch.tensor(0.99))), ValueError, r"betas must be either both floats or both Tensors, "
                                                         r"got \(float, Tensor\)"),
    (dict(lr=torch.tensor(1e-3), foreach=True), ValueError, "lr as a Tensor is not supported for capturable=False "
                                                            "and foreach=True"),
    (dict(foreach=True, fused=True), RuntimeError, "`fused` and `foreach` cannot be `True` together"),
    (dict(capturable=True), NotImplementedError, r"capturable=True \(capturing step\(\) in a CUDA graph\) is not "
                                                 "supported: a step reads the overflow flag on the host"),
    (dict(differentiable=True), NotImplementedError, r"differentiable=True \(autograd through step\(\)\) is not "
                                                     "supported"),
    (dict(maximize=1), TypeError, "maximize must be a bool, got int 1"),
    (dict(decoupled_weight_decay="no"), TypeError, "decoupled_weight_decay must be a bool, got str"),
    (dict(foreach="yes"), TypeError, "foreach must be a bool or None, got str"),
    (dict(fused=0), TypeError, "fused must be a bool or None, got int"),
]


@pytest.mark.parametrize("kwargs,exc,message", BAD_HYPERPARAMETERS, ids=lambda x: str(x)[:40])
def test_bad_hyperparameters_are_rejected_and_params_untouched(kwargs, exc, message):
    p = _p(5, 3)
    ptr = p.data_ptr()
    with pytest.raises(exc, match=message):
        ShardedFusedAdam([p], **kwargs)
    assert p.data_ptr() == ptr, "a rejected constructor re-pointed the param"


def _alias():
    base = torch.randn(10)
    return [base[:6], base[4:]]  # overlapping views (disjoint ones are fine: test_peer_findings.py)


BAD_PARAMS = [
    ([], ValueError, "params is empty"),
    ([{"params": []}], ValueError, "every param group has an empty 'params' list"),
    (torch.randn(3), TypeError, "params must be an iterable of Tensors or dicts"),
    ([1.0, 2.0], TypeError, "optimizer can only optimize Tensors"),
    ([W, W], ValueError, "is the same tensor as"),
    ([{"params": [W]}, {"params": [W]}], ValueError, "more than one parameter group"),
    ([_p(3) * 2], ValueError, "non-leaf"),
    ([torch.zeros(3, dtype=torch.int64)], TypeError, "has dtype torch.int64"),
    ([torch.zeros(3, dtype=torch.complex64)], TypeError, "has dtype torch.complex64"),
    ([torch.zeros(3).to_sparse()], ValueError, "only dense"),
    (_alias(), ValueError, "overlaps the memory range of"),
    ([_p(3), torch.zeros(3, device="meta")], ValueError, "all params must be on one device"),
    ([("fc.weight", _p(2, 2)), ("fc.weight2", torch.zeros(2, dtype=torch.int8))], TypeError,
     "param 'fc.weight2' has dtype torch.int8"),
]


@pytest.mark.parametrize("params,exc,message", BAD_PARAMS, ids=lambda x: str(x)[:30])
def test_bad_params_are_rejected(params, exc, message):
    with pytest.raises(exc, match=message):
        ShardedFusedAdam(params)


def test_a_bad_group_added_later_leaves_the_optimizer_unchanged():
    opt = ShardedFusedAdam([_p(4)], lr=1e-2)
    extra = _p(6)
    ptr = extra.data_ptr()
    with pytest.raises(ValueError, match=r"lr must be >= 0, got -1.0 \(param group 1\)"):
        opt.add_param_group({"params": [extra], "lr": -1.0})
    assert len(opt.param_groups) == 1 and extra.data_ptr() == ptr
    opt.add_param_group({"params": [extra], "lr": 0.5})  # the same param is still welcome
    assert len(opt.param_groups) == 2


def test_adamw_rejects_the_adamw_switch():
    with pytest.raises(TypeError, match="always uses decoupled weight decay"):
        ShardedFusedAdamW([_p(3)], adamw=False)
    with pytest.raises(TypeError, match="do not pass decoupled_weight_decay"):  # torch.optim.AdamW: TypeError too
        ShardedFusedAdamW([_p(3)], decoupled_weight_decay=True)


def test_torch_flags_in_a_param_group_are_checked_there():
    with pytest.raises(NotImplementedError, match=r"capturable=True .* is not supported \(param group 1\)"):
        ShardedFusedAdam([{"params": [_p(3)]}, {"params": [_p(4)], "capturable": True}])
    opt = ShardedFusedAdam([_p(4)], lr=1e-2)
    extra = _p(6)
    with pytest.raises(NotImplementedError, match=r"differentiable=True .* \(param group 1\)"):
        opt.add_param_group({"params": [extra], "differentiable": True})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [extra], "fused": True, "foreach": None, "maximize": True})
    assert opt.param_groups[1]["maximize"] and not opt.param_groups[0]["maximize"]


def test_decoupled_weight_decay_is_adamw_and_foreach_warns_that_it_stays_fused():
    assert ShardedFusedAdam([_p(3)], decoupled_weight_decay=True).param_groups[0]["decoupled_weight_decay"]
    with pytest.warns(UserWarning, match=r"foreach=True asks torch.optim.Adam for a non-fused implementation; "
                                         r"this optimizer always runs its fused kernel"):
        ShardedFusedAdam([_p(3)], foreach=True)
    with pytest.warns(UserWarning, match="fused=False asks"):
        ShardedFusedAdam([_p(3)], fused=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ShardedFusedAdam([_p(3)], fused=True, foreach=False, capturable=False, differentiable=False)


def test_sparse_gradients_are_rejected_with_the_param_name():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = ShardedFusedAdam(emb.named_parameters())
    with pytest.raises(RuntimeError, match="param 'weight' has a sparse gradient"):
        emb(torch.tensor([1, 2])).sum().backward()
        opt.step()


@pytest.mark.parametrize("bad_grad,message", [
    (torch.zeros(5), r"gradient of shape \(5,\) and dtype torch.float32; the param has shape \(3, 4\)"),
    (torch.zeros(3, 4, dtype=torch.float64), "dtype torch.float64; the param has shape .* dtype torch.float32"),
])
def test_a_gradient_that_does_not_match_its_param_is_refused_untouched(bad_grad, message):
    p = _p(3, 4)
    opt = ShardedFusedAdam([("w", p)], lr=0.1)
    before = p.detach().clone()
    p.grad = torch.zeros(3, 4)
    p.grad.data = bad_grad  # torch checks p.grad = ..., but not a rebinding of .data
    with pytest.raises(RuntimeError, match=message):
        opt.step()
    assert torch.equal(p.detach(), before)

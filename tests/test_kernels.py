"""Kernels against torch.optim.Adam/AdamW, the NPU argument translation against the CANN formula."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from sharded_fused_adam.kernels import KERNEL_NAMES, npu, reference, select_kernel, torch_fused

HYPER = [
    dict(weight_decay=0.0, amsgrad=False, decoupled=False, maximize=False),
    dict(weight_decay=0.1, amsgrad=False, decoupled=False, maximize=False),
    dict(weight_decay=0.1, amsgrad=True, decoupled=False, maximize=False),
    dict(weight_decay=0.1, amsgrad=True, decoupled=True, maximize=False),
    dict(weight_decay=0.1, amsgrad=False, decoupled=False, maximize=True),
    dict(weight_decay=0.1, amsgrad=True, decoupled=True, maximize=True),
]


def _tensors(seed: int, dtype=torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g, dtype=dtype) for n in (37, 64, 5, 1000)]


def _run_ours(kernel, hyper, steps: int, dtype=torch.float32) -> list[torch.Tensor]:
    params = _tensors(0, dtype)
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    mx = [torch.zeros_like(p) for p in params]
    for step in range(1, steps + 1):
        grads = _tensors(step, dtype)
        kernel.adam_step(params, grads, m, v, mx if hyper["amsgrad"] else [], [step] * len(params),
                         lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, **hyper)
    return params


def _run_torch(hyper, steps: int, **impl) -> list[torch.Tensor]:
    params = [p.requires_grad_() for p in _tensors(0)]
    cls = torch.optim.AdamW if hyper["decoupled"] else torch.optim.Adam
    opt = cls(params, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=hyper["weight_decay"],
              amsgrad=hyper["amsgrad"], maximize=hyper["maximize"], **impl)
    for step in range(1, steps + 1):
        for p, g in zip(params, _tensors(step)):
            p.grad = g
        opt.step()
    return [p.detach() for p in params]


@pytest.mark.parametrize("hyper", HYPER, ids=lambda h: "-".join(f"{k}={v}" for k, v in h.items()))
def test_reference_matches_torch_single_tensor_bitwise(hyper):
    ours = _run_ours(reference, hyper, 5)
    theirs = _run_torch(hyper, 5, foreach=False)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


@pytest.mark.parametrize("hyper", HYPER, ids=lambda h: "-".join(f"{k}={v}" for k, v in h.items()))
def test_torch_fused_matches_torch_fused_bitwise(hyper):
    ours = _run_ours(torch_fused, hyper, 5)
    theirs = _run_torch(hyper, 5, fused=True)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


def _cann_apply_adam_w(var, m, v, max_grad_norm, grad, a: npu.ApplyAdamWArgs, amsgrad: bool):
    """ApplyAdamW as the CANN documentation and op-plugin's test state it (float64 here)."""
    if a.maximize:
        grad = -grad
    m_out = m * a.beta1 + (1 - a.beta1) * grad
    v_out = v * a.beta2 + (1 - a.beta2) * grad * grad
    var_t = var * (1 - a.lr * a.weight_decay)
    beta1_power_out = a.beta1_power * a.beta1
    beta2_power_out = a.beta2_power * a.beta2
    second = torch.maximum(max_grad_norm, v_out) if amsgrad else v_out
    denom = torch.sqrt(second / (1 - beta2_power_out)) + a.eps
    var_out = var_t - a.lr * m_out / (1 - beta1_power_out) / denom
    return var_out, m_out, v_out, second


@pytest.mark.parametrize("hyper", HYPER, ids=lambda h: "-".join(f"{k}={v}" for k, v in h.items()))
def test_npu_argument_translation_reproduces_adam_under_the_cann_formula(hyper):
    params = _tensors(0, torch.float64)
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    mx = [torch.zeros_like(p) for p in params]
    for step in range(1, 6):
        a = npu.apply_adam_w_args(step=step, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8,
                                  weight_decay=hyper["weight_decay"], decoupled=hyper["decoupled"],
                                  maximize=hyper["maximize"])
        for i, g in enumerate(_tensors(step, torch.float64)):
            g = g + a.l2_weight_decay * params[i] if a.l2_weight_decay else g
            params[i], m[i], v[i], mx[i] = _cann_apply_adam_w(params[i], m[i], v[i], mx[i], g, a,
                                                              hyper["amsgrad"])
    expected = _run_ours(reference, hyper, 5, dtype=torch.float64)
    for ours, ref in zip(params, expected):
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-14)


def test_npu_beta_powers_are_one_step_behind():
    a = npu.apply_adam_w_args(step=1, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, decoupled=True,
                              maximize=False)
    assert (a.beta1_power, a.beta2_power) == (1.0, 1.0)
    a = npu.apply_adam_w_args(step=3, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.5, decoupled=False,
                              maximize=False)
    assert math.isclose(a.beta1_power, 0.81) and math.isclose(a.beta2_power, 0.9801)
    assert (a.weight_decay, a.l2_weight_decay) == (0.0, 0.5)
    # the kernel negates the gradient after we fold L2 in, so the fold flips sign with maximize
    a = npu.apply_adam_w_args(step=3, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.5, decoupled=False,
                              maximize=True)
    assert (a.weight_decay, a.l2_weight_decay, a.maximize) == (0.0, -0.5, True)


def test_npu_kernel_is_unavailable_on_cpu_and_falls_back_with_one_warning():
    assert "only on NPU" in npu.unavailable_reason(torch.device("cpu"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chosen = select_kernel("npu", torch.device("cpu"))
    assert chosen.name == "torch_fused"
    assert len(caught) == 1 and "'npu' is unavailable" in str(caught[0].message)
    assert "falling back to 'torch_fused'" in str(caught[0].message)


def test_default_kernel_on_cpu_is_torch_fused_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select_kernel(None, torch.device("cpu")).name == "torch_fused"
    assert set(KERNEL_NAMES) == {"reference", "torch_fused", "npu"}


def test_unknown_kernel_name_is_rejected():
    with pytest.raises(ValueError, match="kernel must be one of .* got 'fast'"):
        select_kernel("fast", torch.device("cpu"))


def test_when_the_default_is_unavailable_too_the_fallback_is_reference(monkeypatch):
    import sharded_fused_adam.kernels as registry

    broken = registry.AdamKernel("torch_fused", torch_fused.adam_step, lambda device: "no fused op here")
    monkeypatch.setitem(registry._KERNELS, "torch_fused", broken)
    with pytest.warns(RuntimeWarning, match="'torch_fused' is unavailable on cpu: no fused op here; "
                                            "falling back to 'reference'"):
        assert select_kernel(None, torch.device("cpu")).name == "reference"

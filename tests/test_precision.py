"""Loss-scaler schedules and gradient statistics, without a process group."""
from __future__ import annotations

import math

import pytest
import torch

from sharded_fused_adam.numerics.precision import (DynamicLossScaler, LossScaler, any_non_finite, clip_coefficient,
                                                   local_stats, make_loss_scaler, read_stats)


def test_dynamic_scaler_grows_after_the_interval_and_backs_off_after_hysteresis():
    s = DynamicLossScaler(2.0**10, growth_interval=3, hysteresis=2, backoff_factor=0.5, min_scale=2.0**8)
    history = []
    for found_inf in [False, False, False, True, True, True, False, False, False, True, True, True, True]:
        s.update(found_inf)
        history.append(s.scale)
    assert history == [
        2**10, 2**10, 2**11,  # three good steps: grow
        2**11,                # the first overflow only uses up the hysteresis
        2**10, 2**9,          # later overflows back off
        2**9, 2**9, 2**10,    # three good steps: grow (hysteresis restored)
        2**10,                # hysteresis again
        2**9, 2**8, 2**8,     # back off, down to min_scale and no further
    ]


def test_dynamic_scaler_state_round_trips():
    a = DynamicLossScaler(2.0**12, growth_interval=5)
    for flag in (False, True, False):
        a.update(flag)
    b = DynamicLossScaler()
    b.load_state_dict(a.state_dict())
    assert (b.scale, b.hysteresis_left, b.good_steps) == (a.scale, a.hysteresis_left, a.good_steps)


@pytest.mark.parametrize("kwargs,message", [
    (dict(growth_factor=1.0), "growth_factor must be > 1"),
    (dict(backoff_factor=1.0), r"backoff_factor must be in \(0, 1\)"),
    (dict(growth_interval=0), "growth_interval must be >= 1"),
    (dict(hysteresis=0), "hysteresis must be >= 1"),
    (dict(min_scale=2.0**20), "min_scale must be in"),
])
def test_dynamic_scaler_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DynamicLossScaler(2.0**16, **kwargs)


def test_make_loss_scaler():
    assert make_loss_scaler(None).scale == 1.0 and type(make_loss_scaler(None)) is LossScaler
    assert make_loss_scaler(128).scale == 128.0
    assert isinstance(make_loss_scaler("dynamic"), DynamicLossScaler)
    custom = DynamicLossScaler(4.0)
    assert make_loss_scaler(custom) is custom
    static = make_loss_scaler(8.0)
    static.update(True)
    assert static.scale == 8.0


def test_clip_coefficient_matches_torch_formula():
    # torch: max_norm / (norm + 1e-6), clamped at 1. The norms are chosen so the 1e-6 decides:
    # without it the first two would be 1.0 and 1/3, and a norm equal to max_norm would not clip.
    assert clip_coefficient(1e-6, 1e-6) == 0.5
    assert clip_coefficient(3e-6, 1e-6) == pytest.approx(0.25, rel=1e-12)
    assert clip_coefficient(1.0, 1.0) == 1.0 / (1.0 + 1e-6) < 1.0
    assert clip_coefficient(10.0, 1.0) == 1.0 / (10.0 + 1e-6)
    assert clip_coefficient(0.5, 1.0) == 1.0


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_local_stats_norm_matches_torch(norm_type):
    g = [torch.randn(100), torch.randn(37)]
    stats = read_stats(local_stats(g, [True, False, True], norm_type, torch.device("cpu")), norm_type)
    expected = torch.linalg.vector_norm(torch.cat(g), norm_type).item()
    assert stats.norm == pytest.approx(expected, rel=1e-6)
    assert stats.has_grad == (True, False, True) and not stats.found_inf


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_local_stats_flags_non_finite_values(bad):
    g = [torch.randn(10), torch.randn(10)]
    g[1][3] = bad
    assert read_stats(local_stats(g, [True], 2.0, torch.device("cpu")), 2.0).found_inf


def test_a_large_but_finite_norm_is_told_apart_from_a_non_finite_element():
    g = [torch.full((4,), 3e38)]  # squares overflow fp32, the elements do not
    stats = read_stats(local_stats(g, [True], 2.0, torch.device("cpu")), 2.0)
    assert stats.found_inf and math.isinf(stats.norm)  # the cheap flag cannot tell...
    assert not any_non_finite(g, torch.device("cpu")).item()  # ...the element check can
    g.append(torch.tensor([1.0, float("nan")]))
    assert any_non_finite(g, torch.device("cpu")).item()



"""compact_state.py on its own: fp32 values split into bf16 + int16 residual and joined back, bit for bit."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sharded_fused_adam.core.compact_state import SplitMaster, join_fp32, resolve_master_weights, split_fp32

# Low halves around the rounding boundary, and upper halves where rounding carries into the
# exponent (max subnormal, 1.0 - ulp, max finite -> inf), ±0, inf/NaN, even and odd.
EDGE_LOW = [0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF]
EDGE_UPPER = [0x0000, 0x0001, 0x007F, 0x0080, 0x3F7F, 0x3F80, 0x3F81, 0x7F7E, 0x7F7F, 0x7F80, 0x7FC0, 0x7FFF,
              0x8000, 0x8001, 0x807F, 0xBF80, 0xFF7F, 0xFF80, 0xFFFF]


def _bits(values: list[int]) -> torch.Tensor:
    """fp32 tensor with the given 32-bit patterns (given as unsigned or signed ints)."""
    return torch.tensor([v - (1 << 32) if v >= 1 << 31 else v for v in values], dtype=torch.int32).view(torch.float32)


def _round_trip(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    param = torch.empty(values.numel(), dtype=torch.bfloat16)
    residual = torch.empty(values.numel(), dtype=torch.int16)
    ties = split_fp32(values, param, residual)
    return param, join_fp32(param, residual, ties, torch.empty_like(values)), ties


def _check_exact(values: torch.Tensor) -> None:
    param, back, _ = _round_trip(values)
    # The param is exactly torch's rounding (what the 4-byte master path publishes).
    assert torch.equal(param.view(torch.int16), values.to(torch.bfloat16).view(torch.int16))
    nan = torch.isnan(values)
    assert torch.equal(back.view(torch.int32)[~nan], values.view(torch.int32)[~nan])
    assert torch.isnan(back[nan]).all()  # NaN payloads are not kept (see [Note: split masters])


def test_every_low_half_of_the_edge_upper_halves_round_trips():
    upper = torch.tensor(EDGE_UPPER, dtype=torch.int64).repeat_interleave(1 << 16)
    low = torch.arange(1 << 16, dtype=torch.int64).repeat(len(EDGE_UPPER))
    values = ((upper << 16) | low).to(torch.int32)  # int64 -> int32 wraps to the same bit pattern
    _check_exact(values.view(torch.float32))


def test_ties_that_round_down_are_the_only_exceptions():
    # 1.0 + half an ulp (upper half even: the tie goes down to 1.0, residual +2**15);
    # 1.0078125 + half (upper odd: up), and max finite + half (odd: carries to inf).
    values = _bits([0x3F808000, 0x3F818000, 0x7F7F8000, 0x00008000, 0x80008000, 0x3F80FFFF, 0x3F807FFF])
    param, back, ties = _round_trip(values)
    assert ties.tolist() == [0, 3, 4]  # 1.0 + half, +0 + half, -0 + half: all went down
    assert param.view(torch.int16)[2].item() == 0x7F80  # carried into the exponent: inf
    assert torch.equal(back.view(torch.int32), values.view(torch.int32))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.integers(0, (1 << 32) - 1),
                          st.builds(lambda u, lo: (u << 16) | lo, st.sampled_from(EDGE_UPPER) | st.integers(0, 0xFFFF),
                                    st.sampled_from(EDGE_LOW))),
                min_size=1, max_size=1500))
def test_random_bit_patterns_round_trip_exactly(patterns):
    _check_exact(_bits(patterns))


@pytest.mark.parametrize("numel,chunk", [(1000, 64), (4096, 4096), (1030, 512)])
def test_split_master_chunks_hold_the_master_exactly(numel, chunk):
    gen = torch.Generator().manual_seed(numel)
    values = torch.randint(-(1 << 31), 1 << 31, (numel,), dtype=torch.int64, generator=gen).to(torch.int32)
    values[::7] = (values[::7] & ~0xFFFF) | 0x8000  # many ties, in the last, partial block too
    values = values.view(torch.float32)
    values[torch.isnan(values)] = 1.5
    param = torch.zeros(numel, dtype=torch.bfloat16)
    master = SplitMaster(param, chunk)
    master.load(values)
    assert torch.equal(param.view(torch.int16), values.to(torch.bfloat16).view(torch.int16))
    assert torch.equal(master.full().view(torch.int32), values.view(torch.int32))
    ties = ((values.view(torch.int32) & 0x1FFFF) == 0x8000).sum().item()  # low half 0x8000, upper even
    assert master.num_down_ties == ties > 0
    assert master.nbytes == 2 * numel + 8 * ties
    param.fill_(0.25)  # an in-place edit of the params is an edit of the master
    master.reset()
    assert torch.equal(master.full(), torch.full((numel,), 0.25)) and master.num_down_ties == 0


def test_split_applies_to_bf16_only_and_fp16_warns():
    assert resolve_master_weights("split", torch.bfloat16, ["w"]) == "split"
    assert resolve_master_weights("auto", torch.bfloat16, ["w"]) == "fp32"
    assert resolve_master_weights("split", torch.float32, ["w"]) == "fp32"
    with pytest.warns(RuntimeWarning, match=r"fp16 params \['w'\] keep 4-byte fp32 masters"):
        assert resolve_master_weights("split", torch.float16, ["w"]) == "fp32"


@pytest.mark.slow  # about 5 minutes on one core; the edge-case and hypothesis tests above are its short form
def test_all_2_32_bit_patterns_round_trip():
    numel = 1 << 24
    for k in range(1 << 8):
        _check_exact(torch.arange(k * numel, (k + 1) * numel, dtype=torch.int64).to(torch.int32).view(torch.float32))

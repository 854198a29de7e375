"""core/flat_buffer.py on its own: params become views into one flat buffer, and moves are seen."""
from __future__ import annotations

import pytest
import torch

from sharded_fused_adam.core.flat_buffer import FlatParamBuffer, ParamMovedError, check_unmoved
from sharded_fused_adam.core.layout import plan_buckets


def _buffer(world_size: int = 2) -> tuple[FlatParamBuffer, list[torch.nn.Parameter]]:
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(4, 3), (5,), (2, 2, 2)]]
    (layout,) = plan_buckets([(i, p.numel()) for i, p in enumerate(params)], world_size=world_size,
                             bucket_numel=10**6)
    ordered = [params[s.index] for s in layout.slots]
    return FlatParamBuffer(layout, ordered, [f"p{s.index}" for s in layout.slots]), ordered


def test_params_keep_their_values_and_become_views_at_their_slots():
    buffer, params = _buffer()
    values = [p.detach().clone() for p in params]
    for p, slot, value in zip(params, buffer.layout.slots, values):
        assert type(p) is torch.nn.Parameter and torch.equal(p.detach(), value)
        assert p.data_ptr() == buffer.flat.data_ptr() + slot.offset * buffer.flat.element_size()
    buffer.flat.add_(1.0)  # a write through the buffer is a write to the params
    assert all(torch.equal(p.detach(), v + 1.0) for p, v in zip(params, values))
    assert buffer.shard(1).numel() == buffer.layout.shard_numel
    assert buffer.moved() == []


@pytest.mark.parametrize("move, cause", [
    (lambda p: setattr(p, "data", p.detach() * 2.0), "rebound"),
    (lambda p: setattr(p, "data", p.detach().double()), "cast"),
    (lambda p: setattr(p, "data", torch.empty(0)), "freed"),
])
def test_a_moved_param_is_named_with_its_cause(move, cause):
    buffer, params = _buffer()
    with torch.no_grad():
        move(params[1])
    assert buffer.moved() == [1]
    with pytest.raises(ParamMovedError, match=rf"{buffer.names[1]}.*{cause}"):
        check_unmoved([buffer])


def test_an_unchanged_copy_is_readopted_and_a_changed_one_is_not():
    buffer, params = _buffer()
    with torch.no_grad():
        params[0].data = params[0].detach().clone()  # same values elsewhere (e.g. Accelerate's copy)
        params[2].data = params[2].detach() + 1.0
    assert buffer.readopt_unchanged(buffer.moved()) == [2]
    assert buffer.moved() == [2]

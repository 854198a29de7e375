"""NpuFusedAdam's documented hazard, detected: a param that left its flat buffer is named at step()."""
from __future__ import annotations

import pytest
import torch

from sharded_fused_adam import ShardedFusedAdam
from sharded_fused_adam.core.flat_buffer import ParamMovedError


def _model_and_opt():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = ShardedFusedAdam(model.named_parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    return model, opt


def _rebind(model):
    model[0].weight.data = torch.randn(3, 4)


def _free(model):
    model[1].bias.data = torch.empty(0)


def _set(model):
    with torch.no_grad():
        model[0].bias.set_(torch.zeros(3))


def _transpose(model):
    model[1].weight.data = model[1].weight.data.t()


def _to_double(model):
    model.double()


CAUSES = [
    (_rebind, "'0.weight'.*rebound to other memory"),
    (_free, "'1.bias'.*storage was replaced or freed"),
    (_set, "'0.bias'.*rebound to other memory"),
    (_transpose, "'1.weight'.*rebound to other memory"),
    (_to_double, r"param '.*' \(and 3 more\) no longer lives.*cast from torch.float32 to torch.float64, "
                 "e.g. model.half"),
]


@pytest.mark.parametrize("cause,message", CAUSES, ids=[c.__name__ for c, _ in CAUSES])
def test_reallocated_param_is_named_and_nothing_is_updated(cause, message):
    model, opt = _model_and_opt()
    flat_before = [b.buffer.flat.clone() for b in opt.shard_state().buckets]
    exp_avg_before = [b.moment("exp_avg").clone() for b in opt.shard_state().buckets]
    cause(model)
    with pytest.raises(ParamMovedError, match=message):
        opt.step()
    assert all(torch.equal(a, b.buffer.flat) for a, b in zip(flat_before, opt.shard_state().buckets))
    assert all(torch.equal(a, b.moment("exp_avg")) for a, b in zip(exp_avg_before, opt.shard_state().buckets))
    assert all(s == 0 for b in opt.shard_state().buckets for s in b.steps)


def test_in_place_updates_and_reads_are_fine():
    model, opt = _model_and_opt()
    with torch.no_grad():
        model[0].weight.mul_(0.5)
        model[1].bias.copy_(torch.ones(2))
    opt.step()
    assert all(s == 1 for b in opt.shard_state().buckets for s in b.steps)


def test_replaced_parameter_objects_get_no_gradient_and_step_says_so():
    # model.to(<device of another tensor type>) and load_state_dict(assign=True) put *new*
    # Parameter objects into the module: the optimizer's own params are intact but orphaned.
    model, opt = _model_and_opt()
    opt.zero_grad()
    model.to("meta")
    model(torch.randn(2, 4, device="meta")).sum().backward()
    with pytest.warns(RuntimeWarning, match="found no gradient for any parameter"):
        opt.step()


def test_move_error_is_a_runtime_error():
    assert issubclass(ParamMovedError, RuntimeError)


def test_a_device_move_that_changes_nothing_keeps_training():
    """``model.to("cpu:0")`` of a CPU model (Accelerate's device on CPU) copies every param
    unchanged: the optimizer points them back at its buffers and trains as torch does."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    ref = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    ref.load_state_dict(model.state_dict())
    opt = ShardedFusedAdam(model.parameters(), lr=0.1)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.1, fused=True)
    pointers = [p.data_ptr() for p in model.parameters()]
    model.to("cpu:0")
    assert [p.data_ptr() for p in model.parameters()] != pointers  # torch really copied them
    for step in range(3):
        x = torch.randn(2, 4, generator=torch.Generator().manual_seed(step))
        for m, o in ((model, opt), (ref, ref_opt)):
            m(x).sum().backward()
            o.step()
            o.zero_grad()
    assert [p.data_ptr() for p in model.parameters()] == pointers
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


def test_a_copy_with_other_values_is_still_a_move():
    model, opt = _model_and_opt()
    model.to("cpu:0")
    with torch.no_grad():
        model[0].weight.add_(1.0)  # the copy no longer matches the optimizer's slot
    with pytest.raises(ParamMovedError, match="param '0.weight'"):
        opt.step()

"""Every way of saving a model writes every param (see [Note: one storage per param] in flat_buffer.py).

Single process, a model trained one step by ``ShardedFusedAdamW``: each save path is read back
and compared with the model's own ``state_dict()``, bit for bit. Accelerate and safetensors
are the real packages (skipped where absent). The multi-rank, new-launch resumes through
Accelerate and the Trainer are in tests/test_hf_integrations.py.
"""
from __future__ import annotations

import copy
import importlib.util
import io

import pytest
import torch

from helpers import batch, loss_fn, make_net
from sharded_fused_adam import ShardedFusedAdamW
from sharded_fused_adam.core.flat_buffer import ParamMovedError

needs = {m: pytest.mark.skipif(importlib.util.find_spec(m) is None, reason=f"{m} not installed (pip install -e '.[hf]')")
         for m in ("safetensors", "accelerate")}


def _trained(steps: int = 1) -> tuple[torch.nn.Module, ShardedFusedAdamW]:
    model = make_net()
    opt = ShardedFusedAdamW(model.named_parameters(), lr=1e-2)
    for step in range(steps):
        loss_fn(model, *batch(step, 0, same_on_all_ranks=True)).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _expected(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(saved: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(saved) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(saved[key], value), key


def test_every_param_owns_exactly_its_bytes():
    """What safetensors and Accelerate look at: storage pointer and size, one per param."""
    model, _ = _trained()
    seen = set()
    for name, p in model.named_parameters():
        storage = p.untyped_storage()
        assert storage.nbytes() == p.numel() * p.element_size(), name
        assert storage.data_ptr() == p.data_ptr() and storage.data_ptr() not in seen, name
        seen.add(storage.data_ptr())


@needs["safetensors"]
def test_safetensors_save_model(tmp_path):
    import safetensors.torch as st

    model, _ = _trained()
    st.save_model(model, str(tmp_path / "m.safetensors"))  # refused shared storages before
    _assert_same(st.load_file(str(tmp_path / "m.safetensors")), _expected(model))


@needs["accelerate"]
def test_accelerate_save_model_keeps_every_param(tmp_path, capsys, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)  # one process: Accelerator must not look for peers
    import safetensors.torch as st
    from accelerate import Accelerator

    model, _ = _trained()
    Accelerator(cpu=True).save_model(model, str(tmp_path))
    _assert_same(st.load_file(str(tmp_path / "model.safetensors")), _expected(model))
    assert "Removed shared tensor" not in capsys.readouterr().out


def test_torch_save_of_the_model_and_deepcopy_hold_one_param_each(tmp_path):
    model, opt = _trained()
    expected = _expected(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    copied = copy.deepcopy(model)
    for other in (loaded, copied):
        _assert_same(_expected(other), expected)
        for p in other.parameters():  # a copy holds its own bytes, not the optimizer's bucket
            assert p.untyped_storage().nbytes() == p.numel() * p.element_size()
    loss_fn(model, *batch(5, 0, same_on_all_ranks=True)).backward()
    opt.step()  # the optimizer still writes the model, and only the model
    assert not torch.equal(model.fc1.weight, copied.fc1.weight)
    _assert_same(_expected(copied), expected)


def _step_pair(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    loss_fn(model, *batch(step, 0, same_on_all_ranks=True)).backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("move", ["copies", "new_tensors"])
def test_load_state_dict_takes_the_model_a_framework_loaded(move):
    """Accelerate's ``prepare`` on CPU copies every param (``to("cpu:0")``) and ``load_state``
    then loads the model into the copies before the optimizer; the Trainer loads weights into
    new tensors. The optimizer's ``load_state_dict`` takes those values, as torch's does."""
    model, opt = _trained(2)
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=True)
    ref_opt.load_state_dict(opt.state_dict())
    new_values = {n: p.detach() * 0.5 for n, p in model.named_parameters()}
    for (name, p), r in zip(model.named_parameters(), ref.parameters()):
        with torch.no_grad():
            if move == "copies":
                p.data = p.data.clone()  # what model.to("cpu:0") does
                p.copy_(new_values[name])  # what load_state_dict does into the copies
            else:
                p.data = new_values[name].clone()
            r.copy_(new_values[name])
    opt.load_state_dict(opt.state_dict())
    ref_opt.load_state_dict(ref_opt.state_dict())
    for step in range(2, 4):
        _step_pair(model, opt, step)
        _step_pair(ref, ref_opt, step)
    for (name, p), r in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, r), name


def test_a_moved_param_is_still_named_after_a_load():
    """Adoption at load is for moves that fit the slot; a cast still raises at the next step."""
    model, opt = _trained()
    sd = opt.state_dict()
    model.fc1.weight.data = model.fc1.weight.data.double()
    opt.load_state_dict(sd)
    with pytest.raises(ParamMovedError, match="fc1.weight.*cast from torch.float32 to torch.float64"):
        opt.step()


def test_rebinding_between_steps_still_raises():
    model, opt = _trained()
    model.fc2.bias.data = model.fc2.bias.data + 1.0
    loss_fn(model, *batch(1, 0, same_on_all_ranks=True)).backward()
    with pytest.raises(ParamMovedError, match="fc2.bias"):
        opt.step()

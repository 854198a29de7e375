"""The grad watch (grads/grad_watch.py): what accesses mean by phase, and users' objects left usable.

Single process, no process group: ShardedFusedAdam is then a one-rank optimizer, and the watch
is the same. The oracle for loops is torch.optim.AdamW(fused=True) over the same gradients:
one rank averages nothing, so the results are bitwise equal.
"""
from __future__ import annotations

import copy
import gc
import io
import pickle
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from sharded_fused_adam import ShardedFusedAdamW, clip_grad_norm_
from sharded_fused_adam.grads.grad_watch import READ_NONE_WARNING, GradPhase, GradWatch, raw_grad, watch_of

KW = dict(lr=1e-2, weight_decay=0.1)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def _save_load(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


# ---- users' objects stay usable ---------------------------------------------------------------

COPIES = {
    "pickle": lambda m: pickle.loads(pickle.dumps(m)),
    "torch.save": _save_load,
    "deepcopy": copy.deepcopy,
}


@pytest.mark.parametrize("how", sorted(COPIES))
def test_copies_of_a_watched_model_hold_plain_parameters(how):
    model = _model()
    opt = ShardedFusedAdamW(model.parameters(), **KW)
    assert all(watch_of(p) is not None for p in model.parameters())
    copied = COPIES[how](model)
    for p, q in zip(model.parameters(), copied.parameters()):
        assert type(q) is nn.Parameter and q.__dict__ == {}
        assert torch.equal(p.detach(), q.detach()) and q.requires_grad
        assert watch_of(q) is None
    assert opt.param_groups  # the optimizer was alive throughout


def test_watched_params_carry_nothing_in_their_dict_and_rebuild_as_parameters():
    model = _model()
    opt = ShardedFusedAdamW(model.parameters(), **KW)
    p = model[0].weight
    assert type(p) is not nn.Parameter and isinstance(p, nn.Parameter)  # watched
    assert p.__dict__ == {}
    for rebuilt in (nn.Parameter(p), nn.Parameter(p, requires_grad=False), type(p)(p.detach())):
        assert type(rebuilt) is nn.Parameter and "_is_param" not in rebuilt.__dict__
        assert torch.equal(rebuilt.detach(), p.detach())
    assert not nn.Parameter(p, requires_grad=False).requires_grad
    assert type(p.detach()) is torch.Tensor and type(p.clone()) is torch.Tensor
    assert watch_of(p) is not None and opt.param_groups


def test_plain_tensor_params_copy_and_rebuild_as_plain_tensors():
    t = torch.randn(5, requires_grad=True)
    opt = ShardedFusedAdamW([t], **KW)
    assert type(t) is not torch.Tensor
    for how in COPIES.values():
        u = how(t)
        assert type(u) is torch.Tensor and u.requires_grad and torch.equal(u.detach(), t.detach())
    assert type(nn.Parameter(t)) is nn.Parameter
    assert opt.param_groups


def test_the_class_and_hooks_go_with_the_optimizer():
    model = _model()
    opt = ShardedFusedAdamW(model.parameters(), **KW)
    assert all(p._post_accumulate_grad_hooks for p in model.parameters())  # torch's own record of hooks
    del opt
    gc.collect()
    assert all(type(p) is nn.Parameter and watch_of(p) is None for p in model.parameters())
    assert not any(p._post_accumulate_grad_hooks for p in model.parameters())
    model(torch.ones(3, 4)).sum().backward()  # torch's gradients, as if there had been no optimizer
    assert all(p.grad is not None for p in model.parameters())


def test_a_replicated_optimizer_does_not_watch():
    model = _model()
    opt = ShardedFusedAdamW(model.parameters(), grads="replicated", **KW)
    assert all(type(p) is nn.Parameter for p in model.parameters()) and opt.param_groups


# ---- what accesses mean, by phase ---------------------------------------------------------------

class _Strategy:
    phase = GradPhase.STEPPED


def _zeroing_read(m: nn.Module) -> None:
    m.zero_grad()  # torch's Module.zero_grad reads every grad


def test_reads_and_writes_by_phase():
    model, strategy = _model(), _Strategy()
    w = GradWatch(strategy)
    params = list(model.parameters())
    assert w.add(params) == len(params)
    a, b, c = params[:3]
    _ = a.grad                       # STEPPED, not a zeroing function: an ambiguous read
    _zeroing_read(model)             # STEPPED, Module.zero_grad: zeroing
    b.grad = torch.zeros_like(b)     # a write: zeroing
    assert w.take_touched() == {id(p) for p in params}
    w.forgotten({id(a)})             # a was also read by zero_grad: nothing ambiguous was lost
    strategy.phase = GradPhase.BACKWARD
    _ = c.grad
    c.grad = None                    # during backward nothing counts
    assert w.take_touched() == set()
    strategy.phase = GradPhase.REDUCED
    assert c.grad is None and w.read_none_while_reduced
    w.release()
    assert all(type(p) is nn.Parameter for p in params)


def test_an_ambiguous_read_that_lost_a_gradient_warns_once():
    model, strategy = _model(), _Strategy()
    w = GradWatch(strategy)
    w.add(model.parameters())
    p, q = model[0].weight, model[0].bias
    counts = []
    for _ in range(2):
        _ = p.grad
        w.take_touched()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            w.forgotten({id(q)})  # q's gradient was not lost through the read
            w.forgotten({id(p)})
        counts.append(sum("taken as zeroing" in str(c.message) for c in caught))
    assert counts == [1, 0]  # once per optimizer


def test_raw_grad_is_not_seen():
    model, strategy = _model(), _Strategy()
    w = GradWatch(strategy)
    w.add(model.parameters())
    assert raw_grad(model[0].weight) is None
    assert w.take_touched() == set()


# ---- loops against torch ---------------------------------------------------------------------------

def _data(step: int) -> torch.Tensor:
    return torch.randn(6, 4, generator=torch.Generator().manual_seed(step))


def _run(loop, sharded: bool):
    model = _model()
    opt = ShardedFusedAdamW(model.parameters(), **KW) if sharded else torch.optim.AdamW(
        model.parameters(), fused=True, **KW)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(4):
            loop(model, opt, step)
    return [p.detach().clone() for p in model.parameters()], [str(w.message) for w in caught]


def _never_zero_logging(model, opt, step):
    model(_data(step)).pow(2).sum().backward()
    opt.step()
    _ = [p.grad for p in model.parameters()]  # logging after the step


def _model_zero_grad_logging(model, opt, step):
    model(_data(step)).pow(2).sum().backward()
    opt.step()
    _ = [p.grad for p in model.parameters()]
    model.zero_grad()


def _logging_then_opt_zero_grad(model, opt, step):
    model(_data(step)).pow(2).sum().backward()
    opt.step()
    _ = [p.grad for p in model.parameters()]
    opt.zero_grad()


def _hand_zeroing(model, opt, step):
    model(_data(step)).pow(2).sum().backward()
    opt.step()
    for p in model.parameters():
        if p.grad is not None:
            p.grad = None


@pytest.mark.parametrize("loop", [_model_zero_grad_logging, _logging_then_opt_zero_grad, _hand_zeroing])
def test_loops_that_zero_match_torch_bitwise(loop):
    ours, messages = _run(loop, sharded=True)
    ref, _ = _run(loop, sharded=False)
    assert all(torch.equal(a, b) for a, b in zip(ours, ref))
    if loop is not _hand_zeroing:
        assert not any("taken as zeroing" in m for m in messages)


def test_a_never_zero_loop_that_logs_grads_after_step_is_warned_once():
    # torch accumulates across steps; the reads after the step look like a hand-written zeroing loop
    ours, messages = _run(_never_zero_logging, sharded=True)
    ref, _ = _run(_never_zero_logging, sharded=False)
    assert sum("taken as zeroing" in m for m in messages) == 1
    assert not all(torch.equal(a, b) for a, b in zip(ours, ref))  # the difference the warning names


def test_drop_in_clip_finds_the_optimizer_through_the_watch():
    model, ref = _model(), _model()
    opt = ShardedFusedAdamW(model.parameters(), **KW)
    model(_data(0)).pow(2).sum().backward()
    ref(_data(0)).pow(2).sum().backward()
    norm = clip_grad_norm_(model.parameters(), 1e9)
    expected = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1e9)
    # one norm over flat shards against torch's per-param norms: summation order only
    assert abs(norm.item() - expected.item()) < 1e-6 * expected.item()
    assert all(p.grad is None for p in model.parameters()) and opt.param_groups


def test_params_added_later_are_watched_and_released_too():
    model = _model()
    opt = ShardedFusedAdamW(model[0].parameters(), **KW)
    opt.add_param_group({"params": list(model[2].parameters())})
    assert all(watch_of(p) is not None and watch_of(p).owner is opt for p in model.parameters())
    assert all(type(q) is nn.Parameter for q in pickle.loads(pickle.dumps(model)).parameters())
    del opt
    gc.collect()
    assert all(type(p) is nn.Parameter for p in model.parameters())


# ---- the GradScaler loop of docs/mixed-precision.md ------------------------------------------------

DOC_CLIP = "opt.clip_grad_norm_(1.0)"
TORCH_CLIP = "torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)"


def _doc_grad_scaler_loop() -> tuple[str, str]:
    """The page's loop as written: the scaler line (on CPU, as its comment says) and the step lines."""
    page = (Path(__file__).resolve().parent.parent / "docs" / "mixed-precision.md").read_text()
    block = page.split("## torch.amp.GradScaler", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    setup, body = block.split("\n", 1)
    assert 'GradScaler("cuda")' in setup and "scaler.unscale_(opt)" in body and DOC_CLIP in body, block
    return setup.replace('"cuda"', '"cpu"'), body


def _run_doc_loop(sharded: bool, clip: str = DOC_CLIP) -> tuple[list[torch.Tensor], list[str], float]:
    setup, body = _doc_grad_scaler_loop()
    model = _model()
    opt = ShardedFusedAdamW(model.parameters(), **KW) if sharded else torch.optim.AdamW(
        model.parameters(), fused=True, **KW)
    namespace = dict(torch=torch, model=model, opt=opt)
    exec(setup, namespace)
    step_code = compile(body.replace(DOC_CLIP, clip), "docs/mixed-precision.md", "exec")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(4):
            opt.zero_grad()
            namespace["loss"] = model(_data(step)).pow(2).sum()
            exec(step_code, namespace)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    return [p.detach().clone() for p in model.parameters()], messages, namespace["scaler"].get_scale()


def test_the_documented_grad_scaler_loop_is_torch_exact_and_silent():
    ours, messages, scale = _run_doc_loop(sharded=True)
    ref, ref_messages, ref_scale = _run_doc_loop(sharded=False, clip=TORCH_CLIP)
    assert messages == [] and ref_messages == []  # unscale_(opt) finding no param.grad loses nothing
    assert scale == ref_scale
    assert all(torch.equal(a, b) for a, b in zip(ours, ref))


def test_torch_clipping_after_unscale_still_warns_that_it_clipped_nothing():
    _, messages, _ = _run_doc_loop(sharded=True, clip=TORCH_CLIP)
    assert messages == [READ_NONE_WARNING]  # once, for the clip's read, not the scaler's

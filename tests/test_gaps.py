"""Cases where planted bugs once escaped the suite, one section per area: the clipping
drop-ins' arguments, start-up agreement, zero-valued options, the repair of a stale
``LATEST``, and ``del param.grad``. Each is named by a mutant in tools/mutant_list.py.

Oracle: torch (``torch.nn.utils.clip_grad_*_``, ``torch.optim.AdamW(fused=True)``) on the
same gradients; one process: bitwise, except the 2-norm, which our shards sum in another
order (relative ``NORM_RTOL``).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from helpers import batch, loss_fn, make_net
from sharded_fused_adam import (ShardedFusedAdam, ShardedFusedAdamW, ShardingOptions, clip_grad_norm_,
                                clip_grad_value_, save_sharded)
from sharded_fused_adam.checkpoint.files import committed_versions, recover, version_name

NORM_RTOL = 1e-5  # our norms sum per shard, torch's per param (measured 1.2e-6 for the 1-norm)


def _pair(**kw):
    model = make_net()
    ref = copy.deepcopy(model)
    opt = ShardedFusedAdamW(model.parameters(), lr=1e-2, **kw)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=True)
    for m in (model, ref):
        loss_fn(m, *batch(0, 0, same_on_all_ranks=True)).backward()
    return model, opt, ref, ref_opt


def _bitwise(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


# ---- clipping drop-ins: which params, and how -----------------------------------------------
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_clip_grad_norm_takes_torchs_arguments(norm_type):
    model, opt, ref, ref_opt = _pair()
    ours = clip_grad_norm_(model.parameters(), 0.05, norm_type=norm_type, error_if_nonfinite=True)
    theirs = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05, norm_type=norm_type, error_if_nonfinite=True)
    assert abs(ours.item() - theirs.item()) <= NORM_RTOL * theirs.item(), (ours, theirs)
    assert theirs.item() > 0.05  # it clipped
    opt.step()
    ref_opt.step()
    diff = max((x - y).abs().max().item() for x, y in zip(model.parameters(), ref.parameters()))
    assert diff <= (0.0 if norm_type == math.inf else 1e-6), diff  # inf-norm: a max, exact


def test_clip_grad_value_clamps_ours_and_plain_grads_alike():
    model, opt, ref, ref_opt = _pair()
    extra, extra_ref = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    extra.grad, extra_ref.grad = torch.tensor([5.0, -5.0, 1e-4]), torch.tensor([5.0, -5.0, 1e-4])
    clip_grad_value_([*model.parameters(), extra], 0.004)
    torch.nn.utils.clip_grad_value_([*ref.parameters(), extra_ref], 0.004)
    assert torch.equal(extra.grad, extra_ref.grad) and extra.grad.abs().max().item() == pytest.approx(0.004)
    opt.step()
    ref_opt.step()
    assert _bitwise(model, ref)


@pytest.mark.parametrize("clip", ["norm", "value"])
def test_a_subset_of_the_optimizers_params_is_refused(clip):
    model, *_ = _pair()
    fn = (lambda ps: clip_grad_norm_(ps, 1.0)) if clip == "norm" else (lambda ps: clip_grad_value_(ps, 1.0))
    with pytest.raises(ValueError, match="got only some of the trainable params of a ShardedFusedAdam"):
        fn(model.fc1.parameters())


def test_frozen_params_left_out_of_the_clip_are_no_subset():
    model = make_net()
    model.fc1.requires_grad_(False)
    ref = copy.deepcopy(model)
    opt = ShardedFusedAdamW(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=True)
    for m in (model, ref):
        loss_fn(m, *batch(0, 0, same_on_all_ranks=True)).backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    norm = clip_grad_norm_(trainable, 0.05)
    expected = torch.nn.utils.clip_grad_norm_([p for p in ref.parameters() if p.requires_grad], 0.05)
    assert abs(norm.item() - expected.item()) <= NORM_RTOL * expected.item()
    opt.step()
    ref_opt.step()
    diff = max((x - y).abs().max().item() for x, y in zip(model.parameters(), ref.parameters()))
    assert 0 < expected.item() - 0.05 and diff <= 1e-6, diff  # it clipped, like torch


def test_sharded_params_beside_plain_grads_are_refused_unless_those_have_none():
    model, *_ = _pair()
    extra = nn.Parameter(torch.ones(3))
    norm = clip_grad_norm_([*model.parameters(), extra], 1e9)  # extra has no grad: nothing to combine
    assert norm.item() > 0
    extra.grad = torch.ones(3)
    with pytest.raises(ValueError, match=r"param\.grad beside a ShardedFusedAdam's sharded ones"):
        clip_grad_norm_([*model.parameters(), extra], 1.0)


def test_error_if_nonfinite_raises_on_an_infinite_norm_and_otherwise_returns_it():
    model = make_net()
    opt = ShardedFusedAdam(model.parameters(), lr=1e-2)
    (loss_fn(model, *batch(0, 0, same_on_all_ranks=True)) * math.inf).backward()
    with pytest.raises(RuntimeError, match="non-finite"):
        clip_grad_norm_(model.parameters(), 1.0, error_if_nonfinite=True)
    assert not math.isfinite(clip_grad_norm_(model.parameters(), 1.0).item())
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert opt.overflow and all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ---- start-up agreement ---------------------------------------------------------------------
class _Transposed(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(5, 7, generator=g).t())  # non-contiguous (strides 1, 7)
        self.b = nn.Parameter(torch.randn(7, generator=g))


def _broadcast_transposed(rank: int, world_size: int) -> list[torch.Tensor]:
    model = _Transposed(seed=rank)
    assert not model.w.is_contiguous()
    ShardedFusedAdam(model.parameters())
    return [p.detach().clone() for p in model.parameters()]


def test_rank_zero_values_reach_non_contiguous_params(ranks):
    expected = list(_Transposed(seed=0).parameters())
    for params in ranks(_broadcast_transposed, 2):
        assert all(torch.equal(a, b) for a, b in zip(params, expected))


def _unfreeze(rank: int, world_size: int, case: str) -> str:
    model = make_net()
    model.fc1.requires_grad_(False)
    model.fc2.requires_grad_(False)
    opt = ShardedFusedAdam(model.parameters(), collective_timeout=30)
    if case == "same_count":  # one param each, but not the same one
        (model.fc1.weight if rank == 0 else model.fc2.weight).requires_grad_(True)
    else:
        model.fc1.weight.requires_grad_(True)
        if rank == 1:
            model.fc2.weight.requires_grad_(True)
    loss_fn(model, *batch(0, rank, same_on_all_ranks=False)).backward()
    try:
        opt.step()
    except ValueError as exc:
        return str(exc)
    return "no error"


@pytest.mark.parametrize("case, fragment", [
    ("same_count", "the ranks built ShardedFusedAdam over different params: rank(s) [1] differ from rank 0"),
    ("other_count", "ranks disagree on which frozen params became trainable"),
])
def test_ranks_that_unfreeze_different_params_all_raise(ranks, case, fragment):
    for message in ranks(_unfreeze, 2, case):
        assert fragment in message, message


# ---- zero-valued options --------------------------------------------------------------------
@pytest.mark.parametrize("name, fragment", [
    ("bucket_cap_mb", "bucket_cap_mb must be > 0, got 0"),
    ("collective_timeout", "collective_timeout must be > 0 seconds or None, got 0"),
    ("state_dict_timeout", "state_dict_timeout must be > 0 seconds, got 0"),
    ("max_grad_norm", "max_grad_norm must be > 0 or None, got 0"),
    ("loss_scale", "loss scale must be a positive finite number, got 0.0"),
])
@pytest.mark.parametrize("zero", [0, 0.0])
def test_zero_valued_options_are_refused(name, fragment, zero):
    with pytest.raises(ValueError, match=fragment):
        ShardingOptions(**{name: zero})
    with pytest.raises(ValueError, match=fragment):
        ShardedFusedAdam(make_net().parameters(), **{name: zero})


def test_zero_max_grad_norm_set_later_is_refused():
    opt = ShardedFusedAdam(make_net().parameters(), max_grad_norm=1.0)
    with pytest.raises(ValueError, match="max_grad_norm must be > 0 or None, got 0"):
        opt.max_grad_norm = 0
    assert opt.max_grad_norm == 1.0


# ---- a stale LATEST -------------------------------------------------------------------------
def _versions(root, numbers):
    root.mkdir(exist_ok=True)
    for n in numbers:
        (root / version_name(n)).mkdir()


@pytest.mark.parametrize("latest, expected_next", [
    ("v00000001", 3),     # older than the newest committed version: a save killed before its pointer
    ("v00000009", 10),    # names a missing version: the next number is above it anyway
    ("garbage", 3),       # unreadable
    (None, 3),            # missing
])
def test_recover_repairs_latest_and_numbers_above_everything(tmp_path, latest, expected_next):
    root = tmp_path / "ckpt"
    _versions(root, [1, 2])
    (root / "v00000002.tmp").mkdir()  # debris of a killed save: removed, its number still counted
    (root / "LATEST.tmp").write_text("v00000002")
    if latest is not None:
        (root / "LATEST").write_text(latest)
    assert recover(root) == expected_next
    assert (root / "LATEST").read_text() == "v00000002"
    assert sorted(p.name for p in root.iterdir()) == ["LATEST", "v00000001", "v00000002"]


def test_a_save_after_a_stale_latest_commits_above_it(tmp_path):
    model = make_net()
    opt = ShardedFusedAdam(model.parameters())
    root = tmp_path / "ckpt"
    first = save_sharded(opt, root)
    (root / "LATEST").write_text("v00000007")  # a pointer ahead of what is on disk
    second = save_sharded(opt, root, keep_last=2)
    assert second.name == "v00000008" and (root / "LATEST").read_text() == "v00000008", (first, second)
    assert committed_versions(root) == [int(first.name[1:]), 8]


# ---- del param.grad -------------------------------------------------------------------------
def _del_all(m, o, step):
    for p in m.parameters():
        del p.grad


def _del_some(m, o, step):
    for i, p in enumerate(m.parameters()):
        if i % 2:
            del p.grad


def _del_loop(rank: int, world_size: int, idiom: str, grads: str) -> float:
    """Never ``zero_grad()``: ``del p.grad`` after each step (all params or every other one)."""
    model = make_net()
    ref = copy.deepcopy(model)
    opt = ShardedFusedAdamW(model.parameters(), grads=grads, lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=True)
    worst = 0.0
    for step in range(4):
        loss_fn(model, *batch(step, rank, same_on_all_ranks=False)).backward()
        ref_loss = sum(loss_fn(ref, *batch(step, r, same_on_all_ranks=False)) for r in range(world_size))
        (ref_loss / world_size).backward()
        for m, o in ((model, opt), (ref, ref_opt)):
            o.step()
            {"del_all": _del_all, "del_some": _del_some}[idiom](m, o, step)
        worst = max(worst, max((a - b).abs().max().item() for a, b in zip(model.parameters(), ref.parameters())))
    return worst


@pytest.mark.parametrize("grads", ["sharded", "replicated"])
@pytest.mark.parametrize("idiom", ["del_all", "del_some"])
def test_del_param_grad_forgets_like_torch(ranks, idiom, grads):
    # The reference backward averages the two ranks' losses in one graph: gradients round
    # differently from the ranks' sum (as TOL in test_idioms.py).
    for worst in ranks(_del_loop, 2, idiom, grads):
        assert worst < 2e-6, worst


# ---- memory_report() with replicated gradients ----------------------------------------------
@pytest.mark.parametrize("grads, dtype, grad_shards_per_param_byte", [
    ("sharded", torch.float32, 1),      # the reduced fp32 shard (the whole buffer at one rank)
    ("replicated", torch.float32, 0),   # views of the flat gradients, counted in comm_buffers
    ("replicated", torch.bfloat16, 2),  # an fp32 copy of the bf16 shard
])
def test_memory_report_counts_each_gradient_byte_once(grads, dtype, grad_shards_per_param_byte):
    report = ShardedFusedAdam(make_net().to(dtype).parameters(), grads=grads).memory_report()
    assert report.grad_shards == grad_shards_per_param_byte * report.params, report
    assert report.comm_buffers >= (report.params if grads == "replicated" else 0), report


# ---- naming the missing rank ----------------------------------------------------------------
def _probe_missing(rank: int, world_size: int) -> object:
    import time

    from sharded_fused_adam.comm.failures import missing_ranks

    if rank == 2:  # stuck elsewhere: never reaches or fails any collective
        time.sleep(3.0)
        return None
    if rank == 1:  # failed in an earlier collective (a point-to-point exchange with rank 2, say)
        return missing_ranks(5, rank, world_size, probe_s=0.5)
    time.sleep(0.5)  # rank 0 fails later, in collective 7
    return missing_ranks(7, rank, world_size, probe_s=1.0)


def test_a_survivor_that_failed_elsewhere_is_not_named_missing(ranks):
    results = ranks(_probe_missing, 3)
    assert results[0] == [2], results


# ---- the converters' refusals ---------------------------------------------------------------
def test_converters_refuse_what_they_cannot_place(tmp_path):
    from sharded_fused_adam.checkpoint.convert import CheckpointError, load_named, read_ours, read_torch
    from sharded_fused_adam.checkpoint.convert.torch_files import load_lazy

    model = make_net()
    opt = ShardedFusedAdam(model.named_parameters(), lr=1e-2)
    loss_fn(model, *batch(0, 0, same_on_all_ranks=True)).backward()
    opt.step()
    save_sharded(opt, tmp_path / "ours")
    unnamed = ShardedFusedAdam(make_net().parameters(), lr=1e-2)
    with pytest.raises(ValueError, match=r"params \[0, 1, 2, 3, 4\] have no name"):
        load_named(unnamed, read_ours(tmp_path / "ours"))
    sd = torch.optim.Adam(make_net().parameters()).state_dict()
    sd["state"][99] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros(2), "exp_avg_sq": torch.zeros(2)}
    torch.save(sd, tmp_path / "torch.pt")
    with pytest.raises(CheckpointError, match="state for param 99, which is in no param group"):
        read_torch(tmp_path / "torch.pt", [n for n, _ in make_net().named_parameters()])
    torch.save({"t": torch.arange(6.0)}, tmp_path / "t.pt")
    lazy = load_lazy(tmp_path / "t.pt")["t"]
    assert torch.equal(lazy.read(2, 6), torch.arange(2.0, 6.0))
    with pytest.raises(ValueError, match=r"range \[2, 7\) outside a tensor of 6 elements"):
        lazy.read(2, 7)

"""Checkpoints: torch-layout state dicts and sharded files, resharded across world sizes, crash-safe.

Resumed runs are compared bit for bit with an uninterrupted single-process
torch.optim.Adam(fused=True) run fed the gradient each world size actually produces: with
the same gradient g on every rank, gloo sums identical terms, so the averaged gradient is
``(g + g + ... + g) / world_size`` in fp32, which the reference reproduces exactly.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import RankFailed
from helpers import batch, loss_fn, make_net, param_groups
from sharded_fused_adam import (CheckpointError, ShardedFusedAdam, consolidate_sharded, load_full, load_sharded,
                                save_full, save_sharded)

OPT = dict(lr=1e-2, weight_decay=0.05, amsgrad=True)


def _grads(model, step):
    model.zero_grad(set_to_none=True)
    loss_fn(model, *batch(step, 0, same_on_all_ranks=True)).backward()
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return grads


def reference_run(schedule: list[int], dtype=torch.float32) -> list[torch.Tensor]:
    """torch.optim.Adam(fused=True) over len(schedule) steps; step i averages schedule[i] copies.

    Runs with one intra-op thread, like the ranks: a backward with more threads may
    round its reductions differently.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _reference_run(schedule, dtype)
    finally:
        torch.set_num_threads(threads)


def _reference_run(schedule: list[int], dtype) -> list[torch.Tensor]:
    model = make_net().to(dtype)
    opt = torch.optim.Adam(param_groups(model, "two"), fused=True, **OPT)
    for step, world_size in enumerate(schedule):
        for p, g in zip(model.parameters(), _grads(model, step)):
            if g is not None:
                total = g.clone()
                for _ in range(world_size - 1):
                    total = total + g
                p.grad = total / world_size if world_size > 1 else total
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def _train(model, opt, steps):
    for step in steps:
        opt.zero_grad()
        loss_fn(model, *batch(step, 0, same_on_all_ranks=True)).backward()
        opt.step()


def _phase(rank: int, world_size: int, folder: str, fmt: str, start: int, stop: int, load: bool) -> list:
    model = make_net()
    if load:
        model.load_state_dict(torch.load(Path(folder) / "model.pt", weights_only=True))
    opt = ShardedFusedAdam(param_groups(model, "two"), **OPT)
    if load:
        (load_full if fmt == "full" else load_sharded)(opt, Path(folder) / fmt)
    _train(model, opt, range(start, stop))
    (save_full if fmt == "full" else save_sharded)(opt, Path(folder) / fmt)
    if rank == 0:
        torch.save(model.state_dict(), Path(folder) / "model.pt")
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("fmt", ["full", "sharded"])
@pytest.mark.parametrize("before,after", [(1, 3), (2, 4), (4, 3), (3, 1), (2, 2)])
def test_resume_at_another_world_size_equals_an_uninterrupted_run(ranks, tmp_path, fmt, before, after):
    ranks(_phase, before, str(tmp_path), fmt, 0, 3, False)
    results = ranks(_phase, after, str(tmp_path), fmt, 3, 6, True)
    expected = reference_run([before] * 3 + [after] * 3)
    for params in results:
        assert all(torch.equal(a, b) for a, b in zip(params, expected))


def _ours_middle(rank: int, world_size: int, folder: str) -> None:
    model = make_net()
    model.load_state_dict(torch.load(Path(folder) / "model.pt", weights_only=True))
    opt = ShardedFusedAdam(param_groups(model, "two"), **OPT)
    opt.load_state_dict(torch.load(Path(folder) / "torch_opt.pt", weights_only=True))
    _train(model, opt, range(2, 4))
    state = opt.state_dict(rank0_only=True)
    if rank == 0:
        torch.save(state, Path(folder) / "ours_opt.pt")
        torch.save(model.state_dict(), Path(folder) / "model.pt")


def test_torch_adam_to_sharded_at_three_ranks_and_back(ranks, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _torch_to_ours_and_back(ranks, tmp_path)
    finally:
        torch.set_num_threads(threads)


def _torch_to_ours_and_back(ranks, tmp_path):
    model = make_net()
    opt = torch.optim.Adam(param_groups(model, "two"), fused=True, **OPT)
    for step in range(2):
        for p, g in zip(model.parameters(), _grads(model, step)):
            p.grad = g
        opt.step()
    torch.save(opt.state_dict(), tmp_path / "torch_opt.pt")
    torch.save(model.state_dict(), tmp_path / "model.pt")
    ranks(_ours_middle, 3, str(tmp_path))
    model = make_net()
    model.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    opt = torch.optim.Adam(param_groups(model, "two"), fused=True, **OPT)
    opt.load_state_dict(torch.load(tmp_path / "ours_opt.pt", weights_only=True))
    for step in range(4, 6):
        for p, g in zip(model.parameters(), _grads(model, step)):
            p.grad = g
        opt.step()
    expected = reference_run([1, 1, 3, 3, 1, 1])
    assert all(torch.equal(p.detach(), e) for p, e in zip(model.parameters(), expected))


def _low_precision_round_trip(rank: int, world_size: int, folder: str, phase: str) -> dict:
    model = make_net().to(torch.bfloat16)
    opt = ShardedFusedAdam(model.parameters(), lr=1e-3)
    if phase == "save":
        _train(model, opt, range(3))
        sd = opt.state_dict()
        save_sharded(opt, Path(folder) / "bf16")
        if rank == 0:
            torch.save(sd, Path(folder) / "bf16_full.pt")
            torch.save(model.state_dict(), Path(folder) / "model.pt")
        return {}
    model.load_state_dict(torch.load(Path(folder) / "model.pt", weights_only=True))
    before = torch.load(Path(folder) / "bf16_full.pt", weights_only=True)
    out = {}
    for how in ("full", "sharded"):
        if how == "full":
            opt.load_state_dict(before)
        else:
            load_sharded(opt, Path(folder) / "bf16")
        after = opt.state_dict()
        out[how] = all(torch.equal(after["state"][i][k], v) for i, e in before["state"].items() for k, v in e.items())
        out[how + "_has_fp32_masters"] = all(e["master_param"].dtype == torch.float32 for e in after["state"].values())
    return out


def test_bf16_masters_survive_both_formats_across_world_sizes(ranks, tmp_path):
    ranks(_low_precision_round_trip, 2, str(tmp_path), "save")
    for r in ranks(_low_precision_round_trip, 3, str(tmp_path), "load"):
        assert r == {"full": True, "full_has_fp32_masters": True, "sharded": True, "sharded_has_fp32_masters": True}


# ---- crash safety -------------------------------------------------------------------------

def _die_while_saving(rank: int, world_size: int, folder: str, fmt: str) -> None:
    import sharded_fused_adam.checkpoint.sharded as sc

    model = make_net()
    opt = ShardedFusedAdam(param_groups(model, "two"), **OPT)
    _train(model, opt, range(2))
    save = save_full if fmt == "full" else save_sharded
    save(opt, Path(folder) / fmt)
    good = opt.state_dict()
    if rank == 0:
        torch.save(good, Path(folder) / "good.pt")
    _train(model, opt, range(2, 4))
    victim = 1 if fmt == "sharded" else 0

    def dying_write(f, data, *args, **kwargs):  # half a file, then the process is gone
        f.write(b"\0" * 100)
        f.flush()
        os._exit(9)

    if rank == victim:
        if fmt == "sharded":
            sc._write_rank_files = lambda o, folder_: dying_write(open(Path(folder_) / "rank00001.bin", "wb"), None)
        else:
            torch.save = dying_write
    save(opt, Path(folder) / fmt)


def _load_after_crash(rank: int, world_size: int, folder: str, fmt: str) -> bool:
    model = make_net()
    opt = ShardedFusedAdam(param_groups(model, "two"), **OPT)
    (load_full if fmt == "full" else load_sharded)(opt, Path(folder) / fmt)
    good = torch.load(Path(folder) / "good.pt", weights_only=True)
    now = opt.state_dict()
    return all(torch.equal(now["state"][i][k], v) for i, e in good["state"].items() for k, v in e.items())


@pytest.mark.parametrize("fmt", ["full", "sharded"])
def test_a_rank_killed_mid_save_leaves_the_previous_checkpoint_loadable(ranks, tmp_path, fmt):
    with pytest.raises((RankFailed, TimeoutError)):
        ranks(_die_while_saving, 2, str(tmp_path), fmt, timeout_s=20)
    assert ranks(_load_after_crash, 2, str(tmp_path), fmt) == [True, True]


# ---- bad checkpoints (every corruption of every file: test_checkpoint_integrity.py) -------

def _save_one(rank: int, world_size: int, folder: str) -> None:
    model = make_net()
    opt = ShardedFusedAdam(param_groups(model, "two"), **OPT)
    _train(model, opt, range(2))
    save_sharded(opt, Path(folder) / "sharded")
    save_full(opt, Path(folder) / "full.pt")


@pytest.fixture
def saved(ranks, tmp_path):
    ranks(_save_one, 2, str(tmp_path))
    return tmp_path


def _fresh():
    model = make_net()
    opt = ShardedFusedAdam(param_groups(model, "two"), **OPT)
    _train(model, opt, range(1))
    return model, opt


def test_a_checkpoint_of_another_model_is_refused(saved):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = ShardedFusedAdam(model.parameters(), lr=1e-2)
    with pytest.raises(CheckpointError, match="checkpoint has 11 params, the optimizer has 4"):
        load_sharded(opt, saved / "sharded")
    with pytest.raises(ValueError, match="state dict has 2 param groups, the optimizer has 1"):
        load_full(opt, saved / "full.pt")
    other = make_net()
    other.fc1 = torch.nn.Linear(13, 30)
    opt = ShardedFusedAdam(param_groups(other, "two"), **OPT)
    with pytest.raises(ValueError, match=r"state of param 1: exp_avg has shape \(29, 13\), the param has shape \(30, 13\)"):
        load_full(opt, saved / "full.pt")


def test_a_truncated_full_checkpoint_fails_clearly(saved):
    data = (saved / "full.pt").read_bytes()
    (saved / "full.pt").write_bytes(data[: len(data) // 2])
    _, opt = _fresh()
    with pytest.raises(ValueError, match="not a readable optimizer checkpoint"):
        load_full(opt, saved / "full.pt")
    with pytest.raises(FileNotFoundError, match="no optimizer checkpoint at"):
        load_full(opt, saved / "nope.pt")


def test_consolidate_cli_writes_what_the_gathered_state_dict_holds(saved, tmp_path):
    out = tmp_path / "one.pt"
    cli = [sys.executable, "-m", "sharded_fused_adam.checkpoint.cli"]
    run = subprocess.run([*cli, "consolidate", str(saved / "sharded"), str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    consolidated = torch.load(out, weights_only=True)
    full = torch.load(saved / "full.pt", weights_only=True)
    assert consolidated["param_groups"] == full["param_groups"]
    assert consolidated["state"].keys() == full["state"].keys()
    for i, entry in full["state"].items():
        assert all(torch.equal(consolidated["state"][i][k], v) for k, v in entry.items())
    info = subprocess.run([*cli, "inspect", str(saved / "sharded")], capture_output=True, text=True)
    assert json.loads(info.stdout)["world_size"] == 2
    bad = subprocess.run([*cli, "inspect", str(tmp_path / "none")], capture_output=True, text=True)
    assert bad.returncode == 1 and "no committed version" in bad.stderr
    assert consolidate_sharded(saved / "sharded")["sharded_fused_adam"]["world_size"] == 2


def test_keep_last_keeps_only_complete_versions(tmp_path):
    model, opt = _fresh()
    for _ in range(3):
        save_sharded(opt, tmp_path / "ck", keep_last=2)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["LATEST", "LOCK", "v00000002", "v00000003"]
    with pytest.raises(ValueError, match="keep_last must be >= 1"):
        save_sharded(opt, tmp_path / "ck", keep_last=0)


def test_a_state_dict_loaded_after_steps_is_not_ignored():
    # NpuFusedAdam's packing ignores a checkpoint loaded after its first step; ours must not.
    model = make_net()
    opt = ShardedFusedAdam(param_groups(model, "two"), **OPT)
    _train(model, opt, range(2))
    early, early_params = opt.state_dict(), [p.detach().clone() for p in model.parameters()]
    _train(model, opt, range(2, 5))
    with torch.no_grad():
        for p, q in zip(model.parameters(), early_params):
            p.copy_(q)
    opt.load_state_dict(early)
    _train(model, opt, range(2, 4))
    straight = make_net()
    straight_opt = ShardedFusedAdam(param_groups(straight, "two"), **OPT)
    _train(straight, straight_opt, range(4))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), straight.parameters()))


def test_a_torch_state_dict_with_its_own_param_ids_loads_by_position():
    # torch maps saved param ids to params by position in param_groups, whatever the ids are.
    ref = make_net()
    ref_opt = torch.optim.Adam(param_groups(ref, "two"), fused=True, **OPT)
    for step in range(2):
        for p, g in zip(ref.parameters(), _grads(ref, step)):
            p.grad = g
        ref_opt.step()
    saved = ref_opt.state_dict()
    new_id = {i: 1000 - 7 * i for g in saved["param_groups"] for i in g["params"]}  # descending, not 0..n-1
    renumbered = {"state": {new_id[i]: v for i, v in saved["state"].items()},
                  "param_groups": [{**g, "params": [new_id[i] for i in g["params"]]} for g in saved["param_groups"]]}
    model = copy.deepcopy(ref)
    opt = ShardedFusedAdam(param_groups(model, "two"), **OPT)
    opt.load_state_dict(renumbered)
    for p, q, g in zip(model.parameters(), ref.parameters(), _grads(ref, 2)):
        p.grad, q.grad = g, None if g is None else g.clone()
    opt.step()
    ref_opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))


def test_a_torch_state_dict_loaded_into_a_bf16_model_starts_the_masters_from_the_params():
    # torch's dict has no fp32 master: ours must start from the bf16 params, not from zeros
    model = make_net().to(torch.bfloat16)
    ref = [p.detach().float().requires_grad_() for p in model.parameters()]
    ref_opt = torch.optim.Adam(ref, fused=True, **OPT)
    for q in ref:
        q.grad = torch.full_like(q, 0.1)
    ref_opt.step()
    with torch.no_grad():
        for p, q in zip(model.parameters(), ref):
            p.copy_(q)
    opt = ShardedFusedAdam(model.parameters(), **OPT)
    opt.load_state_dict(ref_opt.state_dict())
    state = opt.state_dict()["state"]
    assert all(torch.equal(state[i]["master_param"], p.detach().float()) for i, p in enumerate(model.parameters()))
    assert all(torch.equal(state[i]["exp_avg"], ref_opt.state[q]["exp_avg"]) for i, q in enumerate(ref))

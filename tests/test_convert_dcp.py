"""torch.distributed.checkpoint in torch Adam's layout: FSDP2 (2 ranks) -> ShardedFusedAdam (3) -> FSDP2 (1).

FSDP2 (``fully_shard``) with ``torch.optim.Adam`` saves ``get_optimizer_state_dict`` through
DCP; ShardedFusedAdam loads it at 3 ranks (each rank reading the chunks over its flat
fragments), trains on and saves through DCP, each rank writing only its own bytes; an
FSDP2 job at 1 rank loads that with torchtitan's flattened layout. States are compared bit
for bit with what each side gathers itself (``full_state_dict=True`` / our ``state_dict()``).
"""
from __future__ import annotations

import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)

from sharded_fused_adam import ShardedFusedAdam
from sharded_fused_adam.checkpoint.cli import main as cli_main
from sharded_fused_adam.checkpoint.convert import CheckpointError, load_dcp, read_dcp, read_torch, save_dcp
from sharded_fused_adam.checkpoint.convert.dcp_chunks import boxes

BEFORE, AFTER, LR = 3, 2, 1e-2


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(13, 29)
        self.norm = nn.LayerNorm(29)
        self.cube = nn.Parameter(torch.randn(7, 11, 13) / 10)  # 3-D and split over ranks: up to 5 boxes a rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc1(x)) @ self.cube.reshape(-1, 7)[:29]


def _net() -> Net:
    torch.manual_seed(0)
    return Net()


def _train(model: nn.Module, opt: torch.optim.Optimizer, start: int, steps: int) -> None:
    for step in range(start, start + steps):
        x = torch.randn(6, 13, generator=torch.Generator().manual_seed(step))  # the same batch on every rank
        (model(x) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()


def _full(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _fsdp_writes(rank: int, world_size: int, path: str) -> dict:
    from torch.distributed.fsdp import fully_shard

    model = _net()
    fully_shard(model)
    opt = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=0.01)
    _train(model, opt, 0, BEFORE)
    dcp.save({"optimizer": get_optimizer_state_dict(model, opt)}, checkpoint_id=path)
    return _full(model, opt)


def _ours(rank: int, world_size: int, src: str, dst: str) -> dict:
    model = _net()
    opt = ShardedFusedAdam(model.named_parameters(), lr=0.5)
    load_dcp(opt, src)
    loaded = opt.state_dict()
    _train(model, opt, BEFORE, AFTER)
    save_dcp(opt, dst)
    names, mine = opt.param_groups[0]["param_names"], []  # the chunks this rank owns
    for bucket in opt.shard_state().buckets:
        for frag in bucket.fragments:
            for offsets, _, _ in boxes(tuple(bucket.params[frag.slot].shape), frag.param_start, frag.param_end):
                mine += [(f"optimizer.state.{names[frag.index]}.{key}", offsets) for key in ("exp_avg", "exp_avg_sq")]
    return {"loaded": loaded, "trained": opt.state_dict(), "mine": mine}


def _fsdp_reads(rank: int, world_size: int, path: str) -> dict:
    from torch.distributed.fsdp import fully_shard

    model = _net()
    fully_shard(model)
    opt = torch.optim.Adam(model.parameters(), lr=0.5)
    flat = StateDictOptions(flatten_optimizer_state_dict=True)  # torchtitan's layout
    sd = get_optimizer_state_dict(model, opt, options=flat)
    dcp.load({"optimizer": sd}, checkpoint_id=path)
    set_optimizer_state_dict(model, opt, sd, options=flat)
    return _full(model, opt)


def _assert_same(ours: dict, theirs: dict) -> None:
    """Our index-keyed state (params in model order) equals FSDP2's FQN-keyed one, bit for bit."""
    names = [n for n, _ in _net().named_parameters()]
    assert sorted(theirs["state"]) == sorted(names)
    for i, name in enumerate(names):
        for key, value in theirs["state"][name].items():
            assert torch.equal(ours["state"][i][key].reshape(value.shape), value), (name, key)


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    from conftest import run_ranks

    root = tmp_path_factory.mktemp("dcp")
    theirs = run_ranks(_fsdp_writes, 2, str(root / "fsdp"), tmp_path=root, timeout_s=180)[0]
    ours = run_ranks(_ours, 3, str(root / "fsdp"), str(root / "ours"), tmp_path=root, timeout_s=180)
    back = run_ranks(_fsdp_reads, 1, str(root / "ours"), tmp_path=root, timeout_s=180)[0]
    return root, theirs, ours, back


def test_fsdp2_state_loads_into_ours_at_3_ranks(round_trip):
    _, theirs, ours, _ = round_trip
    for r in ours:
        _assert_same(r["loaded"], theirs)
        assert r["loaded"]["param_groups"][0]["lr"] == LR and r["loaded"]["param_groups"][0]["weight_decay"] == 0.01


def test_fsdp2_resumes_ours_at_1_rank(round_trip):
    _, _, ours, back = round_trip
    names = [n for n, _ in _net().named_parameters()]
    for i, name in enumerate(names):
        assert int(back["state"][name]["step"]) == BEFORE + AFTER
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(back["state"][name][key], ours[0]["trained"]["state"][i][key].view_as(
                back["state"][name][key])), (name, key)
    assert back["param_groups"][0]["lr"] == LR


def test_each_rank_wrote_only_its_own_bytes(round_trip):
    root, _, ours, _ = round_trip
    md = dcp.FileSystemReader(str(root / "ours")).read_metadata()
    for rank, r in enumerate(ours):
        for key, offsets in r["mine"]:
            assert md.storage_data[MetadataIndex(key, torch.Size(offsets))].relative_path.startswith(f"__{rank}_")
    chunks = md.state_dict_metadata["optimizer.state.cube.exp_avg"].chunks
    assert len(chunks) > 3, chunks  # ranks' fragments of a 3-D param start and end mid-row: several boxes


def test_offline_reader_and_cli_round_trip(round_trip, tmp_path):
    root, theirs, _, _ = round_trip
    state = read_dcp(root / "fsdp")
    for name, param in state.params.items():
        assert param.step == BEFORE
        for key, tensor in param.tensors.items():
            assert torch.equal(tensor.read(0, tensor.numel).view(param.shape), theirs["state"][name][key])
    steps = [("dcp", "ours", root / "fsdp", tmp_path / "ours"), ("ours", "dcp", tmp_path / "ours", tmp_path / "dcp"),
             ("dcp", "torch", tmp_path / "dcp", tmp_path / "full.pt")]
    for src_fmt, dst_fmt, src, dst in steps:
        assert cli_main(["convert", "--from", src_fmt, "--to", dst_fmt, str(src), str(dst), "--no-progress"]) == 0
    full = read_torch(tmp_path / "full.pt")
    assert list(full.params) == list(state.params)
    for name, param in full.params.items():
        for key, tensor in param.tensors.items():
            assert torch.equal(tensor.read(0, tensor.numel).view(param.shape), theirs["state"][name][key])


def test_missing_moment_is_refused_and_nothing_changes(round_trip, tmp_path):
    root, theirs, _, _ = round_trip
    sd = {"state": {n: dict(e) for n, e in theirs["state"].items()}, "param_groups": theirs["param_groups"]}
    del sd["state"]["norm.bias"]["exp_avg_sq"]
    dcp.save({"optimizer": sd}, checkpoint_id=str(tmp_path / "broken"), no_dist=True)
    model = _net()
    opt = ShardedFusedAdam(model.named_parameters(), lr=0.5)
    with pytest.raises(CheckpointError, match=r"broken/\.metadata: param 'norm\.bias' has no 'exp_avg_sq'"):
        load_dcp(opt, tmp_path / "broken")
    assert opt.state_dict()["state"] == {} and opt.param_groups[0]["lr"] == 0.5
    shutil.rmtree(tmp_path / "broken")

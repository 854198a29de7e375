"""The pure parts of sharded_fused_adam.checkpoint.convert: chunk boxes, streamed torch files, the
completeness check, and our own formats through the ``convert`` command (no process group)."""
from __future__ import annotations

import json
import re

import pytest
import torch

from helpers import batch, loss_fn, make_net
from sharded_fused_adam import ShardedFusedAdam, consolidate_sharded, save_sharded
from sharded_fused_adam.checkpoint.cli import main as cli_main
from sharded_fused_adam.checkpoint.convert import CheckpointError, check_complete, read_ours, read_torch
from sharded_fused_adam.checkpoint.convert.dcp_chunks import boxes
from sharded_fused_adam.checkpoint.convert.torch_files import load_lazy, placeholder, save_streamed


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), (1, 4, 1, 3)])
def test_boxes_tile_every_flat_range_exactly(shape):
    numel = torch.Size(shape).numel()
    index = torch.arange(numel).view(shape)
    for start in range(numel + 1):
        for end in range(start, numel + 1):
            seen = []
            found = boxes(shape, start, end)
            assert len(found) <= 2 * len(shape) - 1
            for offsets, sizes, flat_start in found:
                box = index[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))].reshape(-1)
                assert torch.equal(box, torch.arange(flat_start, flat_start + box.numel()))  # contiguous
                seen += box.tolist()
            assert seen == list(range(start, end))


def test_streamed_torch_file_reads_and_writes_ranges(tmp_path):
    weights = {"a": torch.randn(5, 7), "b": [torch.arange(10.0).bfloat16()[2:], 3, "x"], "s": torch.tensor(4.0)}
    torch.save(weights, tmp_path / "w.pt")
    lazy = load_lazy(tmp_path / "w.pt")
    assert torch.equal(lazy["a"].read(3, 30), weights["a"].reshape(-1)[3:30])
    assert torch.equal(lazy["b"][0].load(), weights["b"][0]) and lazy["b"][1:] == [3, "x"]
    fillers: dict = {}
    big = placeholder((1000, 3), lambda s, e: torch.arange(s, e, dtype=torch.float32), fillers)
    save_streamed({"big": big, "small": torch.ones(2)}, tmp_path / "out.pt", fillers)
    back = torch.load(tmp_path / "out.pt", weights_only=True)
    assert torch.equal(back["big"], torch.arange(3000.0).view(1000, 3)) and torch.equal(back["small"], torch.ones(2))


def _trained(steps: int = 2, *, with_unused: bool = False) -> ShardedFusedAdam:
    model = make_net()
    params = [(n, p) for n, p in model.named_parameters() if with_unused or not n.startswith("unused.")]
    opt = ShardedFusedAdam(params, lr=1e-2, amsgrad=True)
    for step in range(steps):
        loss_fn(model, *batch(step, 0, same_on_all_ranks=True)).backward()
        opt.step()
        opt.zero_grad()
    return opt


def test_ours_through_every_format_comes_back_bitwise(tmp_path):
    """ours -> dcp -> universal -> deepspeed (3 ranks, stage 1) -> torch, with the progress bar on."""
    opt = _trained()
    save_sharded(opt, tmp_path / "ours")
    model = make_net()
    torch.save(model.state_dict(), tmp_path / "module.pt")
    chain = [("ours", "dcp", "ours", "dcp"), ("dcp", "universal", "dcp", "uni"),
             ("universal", "deepspeed", "uni", "ds"), ("deepspeed", "torch", "ds", "full.pt")]
    for src_fmt, dst_fmt, src, dst in chain:
        args = ["convert", "--from", src_fmt, "--to", dst_fmt, str(tmp_path / src), str(tmp_path / dst),
                "--module", str(tmp_path / "module.pt"), "--world-size", "3", "--stage", "1"]
        assert cli_main(args) == 0
    expected, got = consolidate_sharded(tmp_path / "ours"), torch.load(tmp_path / "full.pt", weights_only=True)
    names = opt.param_groups[0]["param_names"]
    assert got["param_groups"][0]["param_names"] == names
    for i, name in enumerate(got["param_groups"][0]["param_names"]):
        mine = expected["state"][names.index(name)]
        for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert torch.equal(got["state"][i][key], mine[key]), (name, key)
        assert int(got["state"][i]["step"]) == int(mine["step"]) == 2
    assert got["param_groups"][0]["amsgrad"] and got["param_groups"][0]["lr"] == 1e-2


def test_never_stepped_params_block_a_deepspeed_export(tmp_path):
    """OddNet's unused layer never stepped: DeepSpeed's one step per group cannot hold that."""
    save_sharded(_trained(with_unused=True), tmp_path / "ours")
    torch.save(make_net().state_dict(), tmp_path / "module.pt")
    args = ["convert", "--from", "ours", "--to", "deepspeed", str(tmp_path / "ours"), str(tmp_path / "ds"),
            "--module", str(tmp_path / "module.pt"), "--no-progress"]
    assert cli_main(args) == 1


def test_incomplete_state_names_the_param_and_the_file(tmp_path):
    opt = _trained()
    names = opt.param_groups[0]["param_names"]
    sd = opt.state_dict()
    del sd["state"][3]["max_exp_avg_sq"]
    torch.save(sd, tmp_path / "opt.pt")
    with pytest.raises(CheckpointError, match=rf"opt\.pt: param '{re.escape(names[3])}' has no 'max_exp_avg_sq'"):
        read_torch(tmp_path / "opt.pt")
    sd = opt.state_dict()
    del sd["state"][2]
    torch.save(sd, tmp_path / "opt.pt")
    with pytest.raises(CheckpointError, match=rf"param '{re.escape(names[2])}' has no optimizer state"):
        read_torch(tmp_path / "opt.pt")
    state = read_ours_after_save(opt, tmp_path)
    check_complete(state, [n for n in state.params])
    with pytest.raises(CheckpointError, match=r"has no optimizer state for params \['extra'\]"):
        check_complete(state, [*state.params, "extra"])
    (tmp_path / "names.json").write_text(json.dumps(["x"]))
    assert cli_main(["convert", "--from", "ours", "--to", "torch", str(tmp_path / "ours"), str(tmp_path / "t.pt"),
                     "--names", str(tmp_path / "names.json")]) == 1


def read_ours_after_save(opt: ShardedFusedAdam, tmp_path):
    save_sharded(opt, tmp_path / "ours")
    return read_ours(tmp_path / "ours")


@pytest.mark.slow
def test_convert_memory_benchmark_runs_tiny(tmp_path):
    """benchmarks/convert_memory.py end to end at 2M params (four CLI children: ~40 s)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "convert_memory.py"
    done = subprocess.run([sys.executable, str(script), "--params-b", "0.002", "--num-params", "2",
                           "--world-size", "3", "--dir", str(tmp_path / "bench")], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert [r["step"] for r in summary["results"]][1:] == ["deepspeed -> ours", "ours -> dcp",
                                                           "deepspeed -> universal", "ours -> deepspeed"]
    assert all(r["peak_rss_mib"] > 0 for r in summary["results"][1:]) and not (tmp_path / "bench").exists()

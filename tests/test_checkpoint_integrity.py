"""Every kind of checkpoint file, corrupted every way we know: a CheckpointError naming the file and the field,
and the optimizer bitwise unchanged.

One 2-rank save (sharded and gathered, amsgrad so all three moments exist) is copied
for each case; loads run in this process on one rank (``load_sharded`` is not a collective).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import run_ranks
from helpers import batch, loss_fn, make_net, param_groups
from sharded_fused_adam import (CheckpointError, ShardedFusedAdam, consolidate_sharded, load_full, load_sharded,
                                save_full, save_sharded)
from sharded_fused_adam.checkpoint import cli as checkpoint_cli
from sharded_fused_adam.checkpoint.files import CheckpointFileMissing

OPT = dict(lr=1e-2, weight_decay=0.05, amsgrad=True)


def _train(model, opt, steps):
    for step in steps:
        opt.zero_grad()
        loss_fn(model, *batch(step, 0, same_on_all_ranks=True)).backward()
        opt.step()


def _save(rank: int, world_size: int, folder: str) -> None:
    model = make_net()
    opt = ShardedFusedAdam(param_groups(model, "two"), **OPT)
    _train(model, opt, range(2))
    save_sharded(opt, Path(folder) / "sharded")
    save_full(opt, Path(folder) / "full.pt")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved")
    run_ranks(_save, 2, str(folder), tmp_path=folder)
    return folder


@pytest.fixture
def saved(pristine, tmp_path):
    shutil.copytree(pristine / "sharded", tmp_path / "sharded", ignore=shutil.ignore_patterns("LOCK"))
    shutil.copy(pristine / "full.pt", tmp_path / "full.pt")
    return tmp_path


def _version(s: Path) -> Path:
    return s / "sharded" / "v00000001"


def _edit_json(file: Path, edit) -> None:
    doc = json.loads(file.read_text())
    edit(doc)
    file.write_text(json.dumps(doc))


def _flip(file: Path, offset: int, count: int = 8) -> None:
    data = bytearray(file.read_bytes())
    for i in range(offset, offset + count):
        data[i] ^= 0xFF
    file.write_bytes(bytes(data))


def _meta(s):
    return _version(s) / "metadata.json"


def _index(s, r=0):
    return _version(s) / f"rank{r:05d}.json"


def _bin(s, r=1):
    return _version(s) / f"rank{r:05d}.bin"


def _common(s):
    return _version(s) / "common.pt"


def _set(key, value):
    def edit(doc):
        doc[key] = value
    return edit


def _stepped_param(doc):
    return next(p for p in doc["params"] if p["step"] > 0)


def _bump_step(doc):
    _stepped_param(doc)["step"] += 1


def _shift_offset(doc):
    doc["pieces"][0][5] += 4


def _first_tensor_offset(file: Path) -> int:
    """Where the bytes of a tensor the gathered file holds start inside it."""
    state = torch.load(file, weights_only=True)
    tensor = next(iter(state["state"].values()))["exp_avg"]
    where = file.read_bytes().find(tensor.numpy().tobytes())
    assert where > 0
    return where + 4


def _drop_state_entry(file: Path) -> None:
    state = torch.load(file, weights_only=True)
    del state["state"][next(iter(state["state"]))]
    torch.save(state, file)


def _edit_full(file: Path, edit) -> None:
    state = torch.load(file, weights_only=True)
    edit(state)
    torch.save(state, file)


SHARDED = [  # (case, corrupt(saved), exception, file named, field or rule named)
    ("metadata garbage", lambda s: _meta(s).write_bytes(b"\xff\xfe garbage"), CheckpointError,
     "metadata.json", "not valid JSON"),
    ("metadata not an object", lambda s: _meta(s).write_text("[1, 2]"), CheckpointError, "metadata.json",
     "a JSON list"),
    ("metadata missing params", lambda s: _edit_json(_meta(s), lambda d: d.pop("params")), CheckpointError,
     "metadata.json", "missing field 'params'"),
    ("metadata wrong type", lambda s: _edit_json(_meta(s), _set("world_size", "2")), CheckpointError,
     "metadata.json", "field 'world_size' has the wrong type"),
    ("metadata other format", lambda s: _edit_json(_meta(s), _set("format", "dcp")), CheckpointError,
     "metadata.json", "field 'format'"),
    ("metadata other version", lambda s: _edit_json(_meta(s), _set("version", 1)), CheckpointError,
     "metadata.json", "field 'version' is 1"),
    ("metadata newer version", lambda s: _edit_json(_meta(s), _set("version", 3)), CheckpointError,
     "metadata.json", "written by format version 3, this code reads version 2"),
    ("index newer version", lambda s: _edit_json(_index(s), _set("version", 3)), CheckpointError,
     "rank00000.json", "written by format version 3, this code reads version 2"),
    ("index other format", lambda s: _edit_json(_index(s), _set("format", "sharded_fused_adam/sharded-v3")),
     CheckpointError, "rank00000.json", "field 'format' is 'sharded_fused_adam/sharded-v3'.*this code reads"),
    ("metadata step changed", lambda s: _edit_json(_meta(s), _bump_step), CheckpointError,
     "rank00000.json", r"but metadata.json field params\[\d+\].step is 3"),
    ("metadata file dropped", lambda s: _edit_json(_meta(s), lambda d: d["files"].pop()), CheckpointError,
     "metadata.json", "field 'files' lists 1 rank files, but world_size is 2"),
    ("metadata shape changed", lambda s: _edit_json(_meta(s), lambda d: d["params"][1].update(shape=[29, 14])),
     CheckpointError, "", r"param 1|params\[1\]"),
    ("metadata index crc", lambda s: _edit_json(_meta(s), lambda d: d["files"][0].update(index_crc32=7)),
     CheckpointError, "rank00000.json", r"files\[0\].index_crc32"),
    ("metadata edited elsewhere", lambda s: _edit_json(_meta(s), lambda d: d.update(extra=1)), CheckpointError,
     "metadata.json", "field 'crc32' does not match"),
    ("common truncated", lambda s: os.truncate(_common(s), 100), CheckpointError, "common.pt",
     "field common.nbytes"),
    ("common flipped", lambda s: _flip(_common(s), 200), CheckpointError, "common.pt", "field common.crc32"),
    ("common missing", lambda s: _common(s).unlink(), CheckpointFileMissing, "common.pt", "is missing"),
    ("index garbage", lambda s: _index(s).write_text("{"), CheckpointError, "rank00000.json", "not valid JSON"),
    ("index missing pieces", lambda s: _edit_json(_index(s), lambda d: d.pop("pieces")), CheckpointError,
     "rank00000.json", "missing field 'pieces'"),
    ("index offset shifted", lambda s: _edit_json(_index(s), _shift_offset), CheckpointError, "rank00000.json",
     r"files\[0\].index_crc32"),
    ("index piece dropped", lambda s: _edit_json(_index(s), lambda d: d["pieces"].pop(3)), CheckpointError,
     "rank0000", "not at all"),
    ("index piece twice", lambda s: _edit_json(_index(s), lambda d: d["pieces"].append(d["pieces"][2])),
     CheckpointError, "rank0000", "twice"),
    ("index piece out of bounds", lambda s: _edit_json(_index(s), lambda d: d["pieces"][0].__setitem__(4, 10**6)),
     CheckpointError, "rank00000.json", r"pieces\[0\] covers elements"),
    ("index offset past the file", lambda s: _edit_json(_index(s), lambda d: d["pieces"][0].__setitem__(5, 10**9)),
     CheckpointError, "rank00000.json", r"pieces\[0\] has byte offset"),
    ("index step changed", lambda s: _edit_json(_index(s), lambda d: d["steps"][0].__setitem__(1, 9)),
     CheckpointError, "rank00000.json", r"steps\[0\] gives param 0 step 9"),
    ("index rank changed", lambda s: _edit_json(_index(s), _set("rank", 1)), CheckpointError, "rank00000.json",
     "field 'rank' is 1, metadata.json says 0"),
    ("bin flipped", lambda s: _flip(_bin(s), 64), CheckpointError, "rank00001.bin", "fails its CRC-32"),
    ("bin truncated", lambda s: os.truncate(_bin(s, 0), 64), CheckpointError, "rank00000.bin",
     r"truncated or corrupt: 64 bytes, metadata.json field files\[0\].nbytes"),
    ("bin grown", lambda s: _bin(s).write_bytes(_bin(s).read_bytes() + b"\0" * 8), CheckpointError,
     "rank00001.bin", "truncated or corrupt"),
    ("bin missing", lambda s: _bin(s).unlink(), CheckpointFileMissing, "rank00001.bin", "is missing"),
    ("no version at all", lambda s: shutil.rmtree(_version(s)), CheckpointFileMissing, "sharded",
     "no committed version"),
]

FULL = [
    ("full truncated", lambda s: os.truncate(s / "full.pt", 300), CheckpointError, "full.pt", "not a readable"),
    ("full garbage", lambda s: (s / "full.pt").write_bytes(b"garbage"), CheckpointError, "full.pt", "not a readable"),
    ("full flipped", lambda s: _flip(s / "full.pt", _first_tensor_offset(s / "full.pt"), 4), CheckpointError,
     "full.pt", r"field state\[\d+\]\['exp_avg'\] does not match its CRC-32"),
    ("full entry dropped", lambda s: _drop_state_entry(s / "full.pt"), CheckpointError, "full.pt",
     "but the checksums were written for params"),
    ("full newer version", lambda s: _edit_full(s / "full.pt", lambda d: d["sharded_fused_adam"].update(version=2)),
     CheckpointError, "full.pt", "written by format version 2, this code reads version 1"),
    ("full missing", lambda s: (s / "full.pt").unlink(), CheckpointFileMissing, "full.pt", "no optimizer checkpoint"),
]


def _fresh():
    model = make_net(seed=1)
    opt = ShardedFusedAdam(param_groups(model, "two"), **OPT)
    _train(model, opt, range(1))
    return opt


def _snapshot(opt) -> tuple:
    sd = opt.state_dict()
    tensors = {(i, k): v.clone() for i, e in sd["state"].items() for k, v in e.items()}
    return tensors, sd["param_groups"], sd["sharded_fused_adam"]


def _assert_unchanged(before: tuple, opt) -> None:
    after = _snapshot(opt)
    assert before[0].keys() == after[0].keys()
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert before[1:] == after[1:]


@pytest.mark.parametrize("case,corrupt,exc,file,field", SHARDED + FULL, ids=[c[0] for c in SHARDED + FULL])
def test_every_corruption_is_a_checkpoint_error_naming_file_and_field(saved, case, corrupt, exc, file, field):
    corrupt(saved)
    opt = _fresh()
    before = _snapshot(opt)
    load = load_full if case.startswith("full") else load_sharded
    target = saved / ("full.pt" if case.startswith("full") else "sharded")
    with pytest.raises(exc, match=field) as info:
        load(opt, target)
    assert file in str(info.value)
    _assert_unchanged(before, opt)


def test_verify_false_skips_only_the_data_checksums(saved):
    _flip(_bin(saved), 64)
    opt = _fresh()
    load_sharded(opt, saved / "sharded", verify=False)  # loads the flipped bytes: that is what verify=False means
    _edit_json(_index(saved), lambda d: d.pop("pieces"))
    with pytest.raises(CheckpointError, match="missing field 'pieces'"):
        load_sharded(_fresh(), saved / "sharded", verify=False)


def test_consolidate_and_the_cli_verify_every_chunk(saved, tmp_path, capsys):
    # The CLI's entry point in-process (test_checkpoint.py runs it as a command).
    assert checkpoint_cli.main(["verify", str(saved / "sharded")]) == 0
    assert "every checksum matches" in capsys.readouterr().out
    _flip(_bin(saved, 0), 8)
    with pytest.raises(CheckpointError, match="rank00000.bin is corrupt: chunk 0"):
        consolidate_sharded(saved / "sharded")
    for command in (["verify", str(saved / "sharded")],
                    ["consolidate", str(saved / "sharded"), str(tmp_path / "o.pt")]):
        assert checkpoint_cli.main(command) == 1
        assert "rank00000.bin is corrupt" in capsys.readouterr().err, command
    assert not (tmp_path / "o.pt").exists()


def test_a_torch_written_state_dict_still_loads_without_checksums(saved):
    model = make_net()
    ref = torch.optim.Adam(param_groups(model, "two"), fused=True, **OPT)
    _train(model, ref, range(1))
    torch.save(ref.state_dict(), saved / "torch.pt")
    opt = _fresh()
    load_full(opt, saved / "torch.pt")
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], ref.state_dict()["state"][0]["exp_avg"])


def test_the_cli_prints_an_error_line_for_os_and_runtime_errors(saved, tmp_path, capsys):
    """An output it cannot write (a missing folder: torch raises RuntimeError, the OS an OSError), an input that
    is not a torch file: one ``error:`` line, no traceback, exit code 1."""
    for command in (["consolidate", str(saved / "sharded"), str(tmp_path / "no" / "such" / "o.pt")],
                    ["convert", "--from", "torch", "--to", "ours", str(saved / "sharded" / "LATEST"),
                     str(tmp_path / "out"), "--no-progress"]):
        assert checkpoint_cli.main(command) == 1, command
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err, err
    assert not (tmp_path / "no").exists() and not (tmp_path / "out").exists()


def test_convert_to_torch_writes_checksums_that_load_full_verifies(saved, tmp_path):
    out = tmp_path / "converted.pt"
    assert checkpoint_cli.main(["convert", "--from", "ours", "--to", "torch", str(saved / "sharded"), str(out),
                                "--no-progress"]) == 0
    assert "crc32" in torch.load(out, weights_only=True)["sharded_fused_adam"]
    load_full(_fresh(), out)
    _flip(out, _first_tensor_offset(out), 4)
    with pytest.raises(CheckpointError, match=r"converted\.pt is corrupt: field state\[\d+\]\['exp_avg'\]"):
        load_full(_fresh(), out)


def test_load_state_dict_refuses_a_state_dict_of_another_format_version(saved):
    state = torch.load(saved / "full.pt", weights_only=True)
    state["sharded_fused_adam"]["version"] = 7
    opt = _fresh()
    before = _snapshot(opt)
    with pytest.raises(CheckpointError, match="written by format version 7, this code reads version 1"):
        opt.load_state_dict(state)
    _assert_unchanged(before, opt)

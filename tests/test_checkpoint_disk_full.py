"""Every checkpoint writer on a real full filesystem: a ``CheckpointWriteError`` naming the path and the bytes
needed, the previous output intact, no debris; short writes are looped, never ignored.

Each case mounts a small tmpfs (we run as root in CI; elsewhere the mount is refused and the
case skips, saying so), writes a first output, fills the filesystem with ballast until only a
fraction of what the output needs is free, and writes again.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import RankFailed
from sharded_fused_adam import ShardedFusedAdam, load_full, load_sharded, save_full, save_sharded
from sharded_fused_adam.checkpoint.cli import main as cli_main
from sharded_fused_adam.checkpoint.convert.torch_files import placeholder, save_streamed
from sharded_fused_adam.checkpoint.files import CheckpointWriteError
from sharded_fused_adam.checkpoint.outputs import free_bytes

PAGE = 4096
FAST_LEVELS = (0.5,)  # fraction of the output's size left free; the others run with -m slow
SLOW_LEVELS = (0.0, 0.9)


def _run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(command), capture_output=True, text=True)


def _mount(kind: str, where: Path, image: Path) -> None:
    where.mkdir()
    if kind == "tmpfs":
        done = _run("mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(where))
    else:  # no blocks reserved for root (we are root: it could write into them), so "free" is what we may use
        with open(image, "wb") as f:
            f.truncate(24 << 20)
        done = _run("mkfs.ext4", "-q", "-F", "-m", "0", str(image))
        done = _run("mount", "-o", "loop", str(image), str(where)) if done.returncode == 0 else done
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small {kind} filesystem here (needs root and mount): {done.stderr.strip()}")


@pytest.fixture(params=["tmpfs", pytest.param("ext4", marks=pytest.mark.slow)])
def small_fs(request, tmp_path):
    """A small real filesystem at ``tmp_path / "fs"``: a 16 MiB tmpfs, or a 24 MiB ext4 loop image (slow)."""
    fs = tmp_path / "fs"
    _mount(request.param, fs, tmp_path / "ext4.img")
    if request.param == "ext4":
        (fs / "lost+found").rmdir()  # only our files in it, as on tmpfs
    yield fs
    _run("umount", str(fs))


def _fill(fs: Path, leave: int) -> Path:
    """Write ballast until about ``leave`` bytes (whole pages) are free on ``fs``."""
    ballast = fs / "ballast"
    chunk = bytes(1 << 20)
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT)
    try:
        need = free_bytes(fs) - leave
        while need > 0:
            need -= os.write(fd, chunk[: min(len(chunk), need)])
    except OSError:  # ext4 spends blocks on the ballast's own extents: full before "free" reached 0
        pass
    finally:
        os.close(fd)
    assert free_bytes(fs) <= leave + 64 * PAGE  # ext4 keeps some clusters back for its metadata: "free", unusable
    return ballast


def _tree(folder: Path) -> dict:
    """Every file under ``folder`` (hidden ones included) with its digest; the ballast excluded."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in ("ballast", "LOCK")}


def _trained(steps: int) -> ShardedFusedAdam:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.Linear(256, 128))  # ~66k params: 256 KiB per state tensor
    opt = ShardedFusedAdam(list(model.named_parameters()), lr=1e-2)
    for step in range(steps):
        model(torch.randn(4, 128, generator=torch.Generator().manual_seed(step))).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return opt


def _used_by(fs: Path, write) -> int:
    before = free_bytes(fs)
    write()
    return before - free_bytes(fs)


def _assert_full_error(message: str, where: Path) -> None:
    assert str(where) in message and "disk is full" in message and "bytes" in message, message


@pytest.mark.parametrize("level", [*FAST_LEVELS, *(pytest.param(x, marks=pytest.mark.slow) for x in SLOW_LEVELS)])
def test_save_sharded_on_a_full_disk(small_fs, level):
    opt = _trained(1)
    ck = small_fs / "ck"
    size = _used_by(small_fs, lambda: save_sharded(opt, ck))
    before = _tree(ck)
    expected = opt.state_dict()
    _trained_more = _trained(2)
    _fill(small_fs, int(size * level))
    with pytest.raises(CheckpointWriteError) as caught:
        save_sharded(_trained_more, ck)
    _assert_full_error(str(caught.value), ck)
    assert _tree(ck) == before and sorted(p.name for p in ck.iterdir()) == ["LATEST", "LOCK", "v00000001"]
    fresh = _trained(0)
    load_sharded(fresh, ck)
    assert all(torch.equal(fresh.state_dict()["state"][i]["exp_avg"], e["exp_avg"])
               for i, e in expected["state"].items())
    (small_fs / "ballast").unlink()
    assert save_sharded(_trained_more, ck).name == "v00000002"  # room again: the next save works


def _two_ranks_save(rank: int, world_size: int, ck: str, leave_after_first: int) -> None:
    opt = _trained(1)
    save_sharded(opt, ck)
    if rank == 0:
        _fill(Path(ck).parent, leave_after_first)
    torch.distributed.barrier()
    save_sharded(_trained(2), ck)


def test_save_sharded_on_a_full_disk_fails_on_every_rank(small_fs, ranks):
    ck = small_fs / "ck"
    with pytest.raises(RankFailed, match="CheckpointWriteError") as caught:
        ranks(_two_ranks_save, 2, str(ck), 300 * 1024, timeout_s=120)  # room for about one rank file of two
    assert "disk is full" in str(caught.value) or "could not write their files" in str(caught.value)
    assert sorted(p.name for p in ck.iterdir()) == ["LATEST", "LOCK", "v00000001"]


@pytest.mark.parametrize("level", [*FAST_LEVELS, *(pytest.param(x, marks=pytest.mark.slow) for x in SLOW_LEVELS)])
def test_save_full_on_a_full_disk(small_fs, level):
    target = small_fs / "full.pt"
    size = _used_by(small_fs, lambda: save_full(_trained(1), target))
    before = _tree(small_fs)
    _fill(small_fs, int(size * level))
    with pytest.raises(CheckpointWriteError) as caught:
        save_full(_trained(2), target)
    _assert_full_error(str(caught.value), target)
    assert _tree(small_fs) == before  # the old file intact, no .full.pt.tmp* left
    load_full(_trained(0), target)


def _convert(src_fmt: str, dst_fmt: str, src: Path, dst: Path, module: Path) -> list[str]:
    return ["convert", "--from", src_fmt, "--to", dst_fmt, str(src), str(dst), "--module", str(module),
            "--world-size", "2", "--no-progress"]


@pytest.mark.parametrize("level", [*FAST_LEVELS, *(pytest.param(x, marks=pytest.mark.slow) for x in SLOW_LEVELS)])
@pytest.mark.parametrize("target", ["torch", "deepspeed", "universal", "dcp", "ours"])
def test_every_convert_target_on_a_full_disk(small_fs, tmp_path, capsys, target, level):
    opt = _trained(2)
    save_sharded(opt, tmp_path / "ours")
    module = tmp_path / "module.pt"
    torch.save({n: p.detach() for g in opt.param_groups for n, p in zip(g["param_names"], g["params"])}, module)
    first = small_fs / "first"
    size = _used_by(small_fs, lambda: cli_main(_convert("ours", target, tmp_path / "ours", first, module)))
    assert size > 0
    dst = small_fs / ("first" if target != "ours" else "second")  # ours refuses to write over a checkpoint
    before = _tree(small_fs)
    capsys.readouterr()
    _fill(small_fs, int(size * level))
    assert cli_main(_convert("ours", target, tmp_path / "ours", dst, module)) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and "disk is full" in err and "bytes" in err, err
    assert _tree(small_fs) == before  # the previous output intact; no partial file, empty pointer or .tmp file
    assert not [p for p in small_fs.rglob(".*") if ".tmp" in p.name or ".old" in p.name]  # (DCP's .metadata is ok)
    assert target != "ours" or not dst.exists()
    (small_fs / "ballast").unlink()
    assert cli_main(_convert("ours", target, tmp_path / "ours", dst, module)) == 0


def test_short_writes_are_looped_not_ignored(tmp_path, monkeypatch):
    """``os.pwrite`` may write fewer bytes than asked (a nearly full disk does): every byte must land."""
    real = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: real(fd, memoryview(data)[:1000], offset))
    fillers: dict = {}
    big = placeholder((3000,), lambda s, e: torch.arange(s, e, dtype=torch.float32) + 1, fillers)
    save_streamed({"big": big, "small": torch.ones(700)}, tmp_path / "out.pt", fillers)
    back = torch.load(tmp_path / "out.pt", weights_only=True)
    assert torch.equal(back["big"], torch.arange(3000.0) + 1) and torch.equal(back["small"], torch.ones(700))


def test_a_write_that_makes_no_progress_is_an_error_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: 0)
    fillers: dict = {}
    big = placeholder((3000,), lambda s, e: torch.ones(e - s), fillers)
    with pytest.raises(CheckpointWriteError, match=r"out\.pt: the disk is full"):
        save_streamed({"big": big}, tmp_path / "out.pt", fillers)
    assert list(tmp_path.iterdir()) == []

"""launcher.init_distributed in the test process: argument checks, repeat calls, adopting a foreign group."""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist

import launcher

_LAUNCHER_PREFIXES = ("OMPI_", "PMI_", "SLURM_", "SFA_", "MASTER_", "LOCAL_", "TORCHELASTIC_", "CROSS_")


@pytest.fixture
def single_process(monkeypatch):
    """A plain-python environment; any process group is destroyed and exported variables removed after."""
    for name in list(os.environ):
        if name in ("RANK", "WORLD_SIZE") or name.startswith(_LAUNCHER_PREFIXES):
            monkeypatch.delenv(name)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)  # init_distributed exports these
    monkeypatch.setattr(sys, "argv", ["train.py"])
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("kwargs, environ, fragment", [
    ({"timeout": -1}, {}, "timeout must be > 0 seconds, got -1"),
    ({"rendezvous_timeout": 0}, {}, "rendezvous_timeout must be > 0 seconds, got 0"),
    ({}, {"SFA_RENDEZVOUS_TIMEOUT": "soon"}, "SFA_RENDEZVOUS_TIMEOUT must be a number of seconds > 0, got 'soon'"),
    ({}, {"SFA_RENDEZVOUS_TIMEOUT": "-5"}, "SFA_RENDEZVOUS_TIMEOUT must be a number of seconds > 0, got '-5'"),
    ({"backend": "mpi"}, {}, "backend must be one of"),
    ({}, {"SFA_DEVICE": "tpu"}, "SFA_DEVICE must be one of"),
    ({}, {"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK=2 must be < WORLD_SIZE=2"),
])
def test_bad_requests_raise_before_any_process_group(single_process, monkeypatch, kwargs, environ, fragment):
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError) as info:
        launcher.init_distributed(**kwargs)
    assert fragment in str(info.value)
    assert not dist.is_initialized()


def test_single_process_gets_a_one_rank_group_and_repeat_calls_are_harmless(single_process):
    device = launcher.init_distributed("gloo", timeout=30)  # "gloo": the same on CPU-only and GPU machines
    assert device == torch.device("cpu")
    assert (dist.get_rank(), dist.get_world_size(), dist.get_backend()) == (0, 1, "gloo")
    group = dist.group.WORLD
    assert launcher.init_distributed() == device and dist.group.WORLD is group
    assert launcher.init_distributed("gloo", device="cpu") == device
    with pytest.raises(ValueError, match="already initialized with backend 'gloo'"):
        launcher.init_distributed("nccl")
    with pytest.raises(ValueError, match="device='cuda' was requested but this rank already uses cpu"):
        launcher.init_distributed(device="cuda")
    tensor = torch.ones(3)
    dist.all_reduce(tensor)
    assert tensor.tolist() == [1.0, 1.0, 1.0]
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("0", "1", "0")


def test_a_group_initialized_elsewhere_is_adopted(single_process):
    launcher.init_distributed("gloo")
    dist.destroy_process_group()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    group = dist.group.WORLD
    assert launcher.init_distributed() == torch.device("cpu")
    assert dist.group.WORLD is group  # kept, not re-initialized

"""launcher.device: backend and device choice with the machine's accelerators injected."""
from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

from launcher.device import Accelerators, DevicePlan, choose_device, probe_accelerators, resolve_request
from launcher.errors import BackendUnavailableError

NPU4 = Accelerators(npu_count=4)
CUDA2 = Accelerators(cuda_count=2)
BOTH = Accelerators(npu_count=8, cuda_count=2)
NONE = Accelerators()
BROKEN_NPU = Accelerators(npu_error="importing torch_npu failed: ImportError: libhccl.so: cannot open shared object")

CHOICES = [
    # (backend, device, local_rank, accelerators, expected plan)
    ("auto", "auto", 3, NPU4, DevicePlan("hccl", "npu", 3)),
    ("auto", "auto", 1, CUDA2, DevicePlan("nccl", "cuda", 1)),
    ("auto", "auto", 5, NONE, DevicePlan("gloo", "cpu", None)),
    ("auto", "auto", 0, BOTH, DevicePlan("hccl", "npu", 0)),  # NPUs first: this project's home
    ("auto", "auto", 0, BROKEN_NPU, DevicePlan("gloo", "cpu", None)),
    ("gloo", "auto", 1, NPU4, DevicePlan("gloo", "cpu", None)),  # explicit gloo means CPU
    ("gloo", "auto", 1, CUDA2, DevicePlan("gloo", "cpu", None)),
    ("gloo", "cuda", 1, CUDA2, DevicePlan("gloo", "cuda", 1)),
    ("nccl", "auto", 1, BOTH, DevicePlan("nccl", "cuda", 1)),
    ("auto", "cuda", 0, BOTH, DevicePlan("nccl", "cuda", 0)),
    ("auto", "cpu", 7, BOTH, DevicePlan("gloo", "cpu", None)),
    ("hccl", "npu", 7, BOTH, DevicePlan("hccl", "npu", 7)),
    ("HCCL", "NPU", 2, NPU4, DevicePlan("hccl", "npu", 2)),
]


@pytest.mark.parametrize("backend, device, local_rank, accelerators, expected", CHOICES)
def test_choose_device(backend, device, local_rank, accelerators, expected):
    assert choose_device(backend, device, local_rank=local_rank, accelerators=accelerators) == expected


def test_device_plan_device_string():
    assert DevicePlan("hccl", "npu", 3).device == "npu:3"
    assert DevicePlan("gloo", "cpu", None).device == "cpu"


ERRORS = [
    # (backend, device, local_rank, accelerators, exception, message fragment)
    ("nccl", "auto", 0, NONE, BackendUnavailableError, "torch.cuda.is_available() is False"),
    ("nccl", "auto", 0, NPU4, BackendUnavailableError, "backend 'nccl' on device 'cuda' was requested"),
    ("auto", "cuda", 0, NONE, BackendUnavailableError, "set SFA_BACKEND=gloo"),
    ("hccl", "auto", 0, CUDA2, BackendUnavailableError, "torch.npu.device_count() is 0"),
    ("hccl", "auto", 0, BROKEN_NPU, BackendUnavailableError, "libhccl.so"),
    ("auto", "npu", 0, NONE, BackendUnavailableError, "no Ascend NPU"),
    ("auto", "auto", 4, NPU4, ValueError, "local rank 4 needs npu:4 but only 4 npu device(s) are visible"),
    ("auto", "auto", 4, NPU4, ValueError, "ASCEND_RT_VISIBLE_DEVICES"),
    ("nccl", "cuda", 2, CUDA2, ValueError, "CUDA_VISIBLE_DEVICES"),
    ("nccl", "npu", 0, BOTH, ValueError, "backend 'nccl' cannot drive device 'npu'"),
    ("hccl", "cpu", 0, BOTH, ValueError, "backend 'hccl' cannot drive device 'cpu'"),
    ("gloo", "npu", 0, BOTH, ValueError, "backend 'gloo' cannot drive device 'npu'"),
    ("mpi", "auto", 0, NONE, ValueError, "backend must be one of"),
    ("auto", "xpu", 0, NONE, ValueError, "device must be one of"),
]


@pytest.mark.parametrize("backend, device, local_rank, accelerators, exception, fragment", ERRORS)
def test_choose_device_errors(backend, device, local_rank, accelerators, exception, fragment):
    with pytest.raises(exception) as info:
        choose_device(backend, device, local_rank=local_rank, accelerators=accelerators)
    assert fragment in str(info.value)


def test_accelerators_reject_negative_counts():
    with pytest.raises(ValueError, match="cuda_count must be >= 0, got -1"):
        Accelerators(cuda_count=-1)


REQUESTS = [
    # (backend arg, device arg, environ, expected)
    ("auto", "auto", {}, ("auto", "auto")),
    ("auto", "auto", {"SFA_BACKEND": "gloo"}, ("gloo", "auto")),
    ("auto", "auto", {"SFA_BACKEND": "HCCL", "SFA_DEVICE": "npu"}, ("hccl", "npu")),
    ("nccl", "auto", {}, ("nccl", "auto")),
    ("auto", "auto", {"SFA_BACKEND": ""}, ("auto", "auto")),
    ("gloo", "cpu", {"SFA_BACKEND": "gloo", "SFA_DEVICE": "cpu"}, ("gloo", "cpu")),
]


@pytest.mark.parametrize("backend, device, environ, expected", REQUESTS)
def test_resolve_request(backend, device, environ, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_request(backend, device, environ) == expected


def test_resolve_request_argument_wins_with_a_warning():
    with pytest.warns(UserWarning, match="SFA_BACKEND='hccl' is ignored because the script passes backend='gloo'"):
        assert resolve_request("gloo", "auto", {"SFA_BACKEND": "hccl"}) == ("gloo", "auto")


@pytest.mark.parametrize("backend, device, environ, fragment", [
    ("auto", "auto", {"SFA_BACKEND": "mpi"}, "SFA_BACKEND must be one of"),
    ("auto", "auto", {"SFA_DEVICE": "tpu"}, "SFA_DEVICE must be one of"),
    ("ncl", "auto", {}, "backend must be one of"),
])
def test_resolve_request_bad(backend, device, environ, fragment):
    with pytest.raises(ValueError) as info:
        resolve_request(backend, device, environ)
    assert fragment in str(info.value)


def test_probe_on_this_machine_agrees_with_torch():
    probed = probe_accelerators("gloo", "cpu")
    expected_cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert probed.cuda_count == expected_cuda
    assert probed.npu_count == 0  # an explicit CPU request never probes NPUs


@pytest.mark.skipif(importlib.util.find_spec("torch_npu") is not None, reason="torch_npu is installed here")
def test_explicit_hccl_without_torch_npu_names_the_import_failure():
    accelerators = probe_accelerators("hccl", "auto")
    assert accelerators.npu_count == 0 and "torch_npu" in (accelerators.npu_error or "")
    with pytest.raises(BackendUnavailableError, match="importing torch_npu failed"):
        choose_device("hccl", "auto", local_rank=0, accelerators=accelerators)

"""An ``hccl`` process group for the emulated NPU: gloo underneath, ProcessGroupHCCL's rules on top.

[Note: emulated HCCL rules]
Read in torch_npu's ``ProcessGroupHCCL.cpp``, and enforced here so that code which breaks
them fails on the emulated NPU as it would on Ascend hardware:

* ``reduce_scatter_single`` (``reduce_scatter_tensor``) needs input numel == output numel x
  world size exactly, and ``all_gather_single`` output numel == input numel x world size;
* reductions reject fp64 (all Ascend chips but the 950);
* there is no ``gather``;
* ``Work.wait(timeout)`` blocks the host only when ``TORCH_HCCL_BLOCKING_WAIT=1``; otherwise the
  timeout bounds nothing (here: the wait lasts until gloo's own, process-group, timeout).

Device memory is host memory in the emulation, so gloo works on zero-copy CPU aliases of the
NPU tensors (no device-to-host copy is made or counted).
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import ProcessGroupGloo

__all__ = ["HcclProcessGroup", "register"]

_NO_FP64 = (torch.float64,)


def _blocking_wait() -> bool:
    return os.environ.get("TORCH_HCCL_BLOCKING_WAIT", "0") == "1"


class _Work(dist.Work):
    """Wraps a gloo work; ``keep`` holds the NPU tensors whose host aliases gloo writes."""

    def __init__(self, inner: dist.Work, keep: Sequence[torch.Tensor], then: Optional[Callable[[], None]] = None):
        super().__init__()
        self._inner, self._keep, self._then = inner, list(keep), then

    def wait(self, timeout: timedelta = timedelta(0)) -> bool:
        if _blocking_wait() and timeout and timeout.total_seconds() > 0:
            self._inner.wait(timeout)
        else:
            self._inner.wait()  # as WorkHCCL: the timeout argument does not bound the host
        if self._then is not None:
            then, self._then = self._then, None
            then()
        self._keep = []
        return True

    def is_completed(self) -> bool:
        return self._inner.is_completed()

    def is_success(self) -> bool:
        return self._inner.is_success()


class HcclProcessGroup(dist.ProcessGroup):
    """A ProcessGroup named ``hccl`` for ``npu`` tensors that runs its collectives through gloo."""

    def __init__(self, store: dist.Store, rank: int, world_size: int, timeout: timedelta, alias: Callable):
        super().__init__(rank, world_size)
        self._gloo = ProcessGroupGloo(store, rank, world_size, timeout)
        self._alias = alias  # npu tensor -> CPU tensor on the same memory

    def getBackendName(self) -> str:  # noqa: N802 (torch's name)
        return "hccl"

    def name(self) -> str:
        return "hccl"

    def _host(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [self._alias(t) if t.device.type == "npu" else t for t in tensors]

    @staticmethod
    def _check_reduction(what: str, tensors: Sequence[torch.Tensor]) -> None:
        for t in tensors:
            if t.dtype in _NO_FP64:
                raise RuntimeError(f"HCCL {what}: dtype {t.dtype} is not supported for reductions "
                                   "(HCCL reduces int8/16/32/64, fp16, fp32 and bf16)")

    def allreduce(self, tensors: list[torch.Tensor], opts: Any = None) -> dist.Work:
        self._check_reduction("allreduce", tensors)
        opts = opts or dist.AllreduceOptions()
        return _Work(self._gloo.allreduce(self._host(tensors), opts), tensors)

    def reduce(self, tensors: list[torch.Tensor], opts: Any) -> dist.Work:
        self._check_reduction("reduce", tensors)
        return _Work(self._gloo.reduce(self._host(tensors), opts), tensors)

    def broadcast(self, tensors: list[torch.Tensor], opts: Any = None) -> dist.Work:
        return _Work(self._gloo.broadcast(self._host(tensors), opts or dist.BroadcastOptions()), tensors)

    def reduce_scatter_single(self, output: torch.Tensor, input: torch.Tensor, opts: Any) -> dist.Work:
        self._check_reduction("reduce_scatter", [input])
        if input.numel() != output.numel() * self.size():
            raise RuntimeError(f"HCCL reduce_scatter: input numel {input.numel()} must be output numel "
                               f"{output.numel()} x world size {self.size()}")
        out, inp = self._host([output, input])
        return _Work(self._gloo._reduce_scatter_base(out, inp, opts), [output, input])

    _reduce_scatter_base = reduce_scatter_single

    def all_gather_single(self, output: torch.Tensor, input: torch.Tensor, opts: Any) -> dist.Work:
        if output.numel() != input.numel() * self.size():
            raise RuntimeError(f"HCCL all_gather: output numel {output.numel()} must be input numel "
                               f"{input.numel()} x world size {self.size()}")
        out, inp = self._host([output, input])
        return _Work(self._gloo._allgather_base(out, inp, opts), [output, input])

    _allgather_base = all_gather_single

    def allgather(self, outputs: list[list[torch.Tensor]], inputs: list[torch.Tensor], opts: Any = None) -> dist.Work:
        host_outputs = [self._host(o) for o in outputs]
        keep = [t for o in outputs for t in o] + list(inputs)
        return _Work(self._gloo.allgather(host_outputs, self._host(inputs), opts or dist.AllgatherOptions()), keep)

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int) -> dist.Work:
        return _Work(self._gloo.send(self._host(tensors), dst, tag), tensors)

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int) -> dist.Work:
        return _Work(self._gloo.recv(self._host(tensors), src, tag), tensors)

    def barrier(self, opts: Any = None) -> dist.Work:
        return _Work(self._gloo.barrier(opts or dist.BarrierOptions()), [])

    def gather(self, *args: Any, **kwargs: Any) -> dist.Work:
        raise RuntimeError("ProcessGroupHCCL does not support gather")


def register(alias: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Make ``init_process_group("hccl")`` build an ``HcclProcessGroup`` (once per process)."""
    if "hccl" in dist.Backend.backend_list:
        return

    def create(store: dist.Store, rank: int, world_size: int, timeout: timedelta) -> HcclProcessGroup:
        return HcclProcessGroup(store, rank, world_size, timeout, alias)

    dist.Backend.register_backend("hccl", create, devices=["npu"])

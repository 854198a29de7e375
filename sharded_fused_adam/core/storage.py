"""How one shard's master and moments are stored: small strategies behind one interface.

[Note: state storage]
Each state tensor of a shard (the master, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``) is
held by one strategy object, chosen once when the bucket is built:

* ``Stored``: a plain tensor. The kernel updates it *in place* when it has the compute dtype
  and lives on the compute device (fp32 moments, the 4-byte fp32 master of a low-precision
  model); otherwise it is *staged* (bf16 moments: widened into fp32 scratch and rounded back).
* ``ParamMaster``: the master of an fp32/fp64 model is its own param shard: in place, no bytes
  of its own, nothing to checkpoint or publish.
* ``SplitStored``: the bf16 param plus an int16 residual (see [Note: split masters]); staged by
  rebuilding the fp32 master into scratch and splitting it back.
* ``Offloaded``: a ``Stored`` whose tensor lives in host memory (pinned when the compute device
  is an accelerator) and is always staged: each chunk is copied to device scratch, updated
  there by the same kernel, and copied back, so an offloaded shard trains bit for bit like a
  resident one (see [Note: host offload]).

``Bucket`` asks only ``in_place`` and ``bind`` (the stage/unstage pair of one chunk), so a new
way of holding state is one more class here, not a branch there.

[Note: host offload]
With ``offload="host"`` the optimizer state (moments, and the fp32 masters of fp16/bf16
params) lives in host memory and the update streams it through the device chunk by chunk
(``OFFLOAD_CHUNK_NUMEL`` elements), instead of running Adam on the host as DeepSpeed's
ZeRO-Offload does. The reason is bitwise equality: the device's fused kernel and a host Adam
are different implementations (vector widths, FMA contraction), so only streaming keeps
offloaded training identical to resident training and checkpoints interchangeable. The cost
is traffic: 2 x (4 + 8) bytes per element over the host link per step for fp32 masters and
moments, against about 8 for a host update (gradient down, param up). The fp32 master of an
fp32 model is its param shard, which must stay on the device; only its moments move. One
scratch area, shared by every bucket of the optimizer, holds the chunks in flight, so the
device keeps at most two chunks of state at a time. Host-to-device copies are issued
non-blocking from pinned memory on the compute stream; the device-to-host write-back is
waited for at the end of each bucket's update. On a CPU-only machine the "device" is the host:
the strategy then moves bytes between two host tensors, which tests its bookkeeping, not its
speed.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

from ..kernels import same_dtype
from ..kernels.rule import ADAM
from .compact_state import SplitMaster

__all__ = ["OFFLOAD_CHUNK_NUMEL", "OFFLOADS", "Offloaded", "ParamMaster", "Scratch", "SplitStored", "Stored",
           "StateStorage"]

OFFLOADS = (None, "host")
# Elements per streamed chunk: a multiple of 16 (see [Note: staged update]); 4 MiB per fp32 row
# keeps each host-device copy large enough to run near the link's bandwidth.
OFFLOAD_CHUNK_NUMEL = 1 << 20

Bound = tuple[Callable[[], object], Callable[[], object]]


class Stored:
    """A state shard held as one plain tensor (see [Note: state storage]).

    Args:
        tensor: the stored values (any dtype; its device decides whether it is staged).
        compute_dtype: the dtype the kernel runs in.
        device: the compute device.
        reads_in_place: whether the kernel updates ``tensor``'s dtype in place (else: staged).
    """

    counted = True  # its bytes are optimizer state (ParamMaster's are the model's own)
    checkpointed = True
    num_down_ties = 0  # see SplitStored

    def __init__(self, tensor: torch.Tensor, compute_dtype: torch.dtype, device: torch.device,
                 reads_in_place: Callable[[torch.dtype, torch.dtype], bool] = same_dtype):
        self.tensor = tensor
        self.in_place = tensor.device == device and reads_in_place(compute_dtype, tensor.dtype)

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size() if self.counted else 0

    @property
    def host_nbytes(self) -> int:
        """Bytes held in host memory on behalf of an accelerator (only offloaded state)."""
        return 0

    def bind(self, k: int, lo: int, hi: int, row: torch.Tensor) -> Bound:
        """The stage and unstage actions of chunk ``k`` (``[lo, hi)`` of the shard) on ``row``."""
        stored, scratch = self.tensor.narrow(0, lo, hi - lo), row.narrow(0, 0, hi - lo)
        return functools.partial(scratch.copy_, stored), functools.partial(stored.copy_, scratch)  # rounds to nearest-even

    def full(self) -> torch.Tensor:
        """The whole shard, for a checkpoint (the stored tensor itself where it is not split)."""
        return self.tensor

    def load(self, value: Optional[torch.Tensor]) -> None:
        """Store ``value`` (shard-shaped, any dtype and device); None: zeros."""
        self.tensor.copy_(value) if value is not None else self.tensor.zero_()

    def publish(self, param_shard: torch.Tensor) -> None:
        """Round the master into the params (for a master; a moment is never published)."""
        param_shard.copy_(self.tensor)

    def refresh(self, param_shard: torch.Tensor) -> None:
        """Make the master equal the params (after they were edited in place)."""
        self.tensor.copy_(param_shard)

    def finish(self) -> None:
        """Called after a bucket's update: wait for anything still writing the stored tensor."""


class ParamMaster(Stored):
    """The master of an fp32/fp64 model: the param shard itself (in place, never published)."""

    counted = False
    checkpointed = False

    def publish(self, param_shard: torch.Tensor) -> None:
        pass

    def refresh(self, param_shard: torch.Tensor) -> None:
        pass


class Offloaded(Stored):
    """A ``Stored`` whose tensor lives in host memory and is always staged (see [Note: host offload])."""

    def __init__(self, tensor: torch.Tensor, compute_dtype: torch.dtype, device: torch.device,
                 reads_in_place: Callable[[torch.dtype, torch.dtype], bool] = same_dtype):
        super().__init__(tensor, compute_dtype, device)
        self.in_place = False
        self._accelerator = device.type != "cpu"

    @property
    def host_nbytes(self) -> int:
        return self.nbytes

    def bind(self, k: int, lo: int, hi: int, row: torch.Tensor) -> Bound:
        stored, scratch = self.tensor.narrow(0, lo, hi - lo), row.narrow(0, 0, hi - lo)
        stage = functools.partial(scratch.copy_, stored, non_blocking=self._accelerator)
        return stage, functools.partial(stored.copy_, scratch, non_blocking=self._accelerator)

    def finish(self) -> None:
        if self._accelerator:  # the non-blocking write-backs must land before the host reads them
            torch.accelerator.synchronize()


class SplitStored:
    """A bf16 model's master held as its param shard plus an int16 residual (see [Note: split masters])."""

    in_place = False
    checkpointed = True
    host_nbytes = 0

    def __init__(self, param_shard: torch.Tensor, chunk_numel: int):
        self.split = SplitMaster(param_shard, chunk_numel)

    @property
    def nbytes(self) -> int:
        return self.split.nbytes

    @property
    def num_down_ties(self) -> int:
        """Elements whose residual is a tie that went down (see [Note: split masters])."""
        return self.split.num_down_ties

    def bind(self, k: int, lo: int, hi: int, row: torch.Tensor) -> Bound:
        values = row.narrow(0, 0, hi - lo)
        bits = values.view(torch.int32)
        return functools.partial(self.split.join, k, bits), functools.partial(self.split.split, k, values, bits)

    def full(self) -> torch.Tensor:
        return self.split.full()

    def load(self, value: Optional[torch.Tensor]) -> None:
        self.split.load(value) if value is not None else self.split.reset()

    def publish(self, param_shard: torch.Tensor) -> None:
        pass  # every split already rounded the master into the params

    def refresh(self, param_shard: torch.Tensor) -> None:
        self.split.reset()

    def finish(self) -> None:
        pass


class Scratch:
    """The compute-dtype rows a staged update runs on: one per bucket, or one shared by the
    offloaded buckets of a param group (a bucket rebuilds its cached views when it grows)."""

    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dtype, self.device = dtype, device
        self.tensor: Optional[torch.Tensor] = None
        self.generation = 0  # bumped on every reallocation: views of the old rows are stale

    @property
    def nbytes(self) -> int:
        return 0 if self.tensor is None else self.tensor.numel() * self.tensor.element_size()

    def rows(self, need: int, width: int) -> list[torch.Tensor]:
        """At least ``need`` rows of at least ``width`` elements (grown, never shrunk)."""
        if self.tensor is None or self.tensor.shape[0] < need or self.tensor.shape[1] < width:
            old = (0, 0) if self.tensor is None else tuple(self.tensor.shape)
            self.tensor = None  # free the old rows before allocating the new ones
            self.tensor = torch.empty(max(need, old[0]), max(width, old[1]), dtype=self.dtype, device=self.device)
            self.generation += 1
        return list(self.tensor.unbind(0))


class StateStorage:
    """One shard's master and moments, each held by a strategy (see [Note: state storage]).

    Args:
        param_shard: this rank's slice of the flat params.
        master_weights: ``"fp32"`` or ``"split"`` (bf16 params only).
        state_dtype: the moments' stored dtype (None: the compute dtype).
        offload: None or ``"host"`` (see [Note: host offload]).
        chunk_numel: elements per staged chunk.
        scratch: the scratch to stage in (None: a new one of this shard's own).
        reads_in_place: the kernel's declaration of the stored dtypes it updates in place.
    """

    def __init__(self, param_shard: torch.Tensor, *, master_weights: str, state_dtype: Optional[torch.dtype],
                 offload: Optional[str], chunk_numel: int, scratch: Optional[Scratch] = None,
                 reads_in_place: Callable[[torch.dtype, torch.dtype], bool] = same_dtype):
        low_precision = param_shard.dtype in (torch.float16, torch.bfloat16)
        self.compute_dtype = torch.float32 if low_precision else param_shard.dtype
        self.device = param_shard.device
        self.numel = param_shard.numel()
        self.chunk_numel = chunk_numel
        self.state_dtype = state_dtype or self.compute_dtype
        self._holder = Offloaded if offload == "host" else Stored
        self._reads_in_place = reads_in_place  # the kernel's declaration (kernels/__init__.py)
        self.scratch = scratch or Scratch(self.compute_dtype, self.device)
        if master_weights == "split":
            self.master = SplitStored(param_shard, chunk_numel)
        elif low_precision:
            self.master = self._hold(torch.float32)
            self.master.tensor.copy_(param_shard)
        else:
            self.master = ParamMaster(param_shard, self.compute_dtype, self.device)
        self.moments = {key: self._hold(self.state_dtype) for key in ADAM.moment_keys}

    def _hold(self, dtype: torch.dtype) -> Stored:
        """A zero shard of ``dtype``, on the device or (offloaded) in host memory."""
        offloaded = self._holder is Offloaded
        tensor = torch.zeros(self.numel, dtype=dtype, device="cpu" if offloaded else self.device,
                             pin_memory=offloaded and self.device.type != "cpu")
        return self._holder(tensor, self.compute_dtype, self.device, self._reads_in_place)

    def add_amsgrad(self) -> None:
        for key in ADAM.keys_for({"amsgrad": True}):
            if key not in self.moments:
                self.moments[key] = self._hold(self.state_dtype)

    def held(self, amsgrad: bool) -> list:
        """The strategies of the tensors a kernel call reads, in its order: master, moments."""
        return [self.master] + [self.moments[k] for k in ADAM.keys_for({"amsgrad": amsgrad})]

    @property
    def is_staged(self) -> bool:
        return not all(s.in_place for s in [self.master, *self.moments.values()])

    @property
    def nbytes(self) -> tuple[int, int, int]:
        """(master bytes, moment bytes, of which in host memory)."""
        held = [self.master, *self.moments.values()]
        return self.master.nbytes, sum(s.nbytes for s in self.moments.values()), sum(s.host_nbytes for s in held)

    def finish(self) -> None:
        for s in [self.master, *self.moments.values()]:
            s.finish()

"""One flat tensor per bucket; the model's params become ordinary views into it.

[Note: params are views]
At construction each param's values are copied into its bucket's flat buffer and
``param.data`` is re-pointed at the matching view. From then on the all-gather writes the
params in place, and nothing else may move them: ``model.cpu()``, ``model.half()``,
``param.data = ...`` or freeing a param's storage would silently detach the model from the
optimizer (NpuFusedAdam documents this as "unpredictable results"). ``FlatParamBuffer``
remembers where every view must live and ``check_unmoved`` names the first param that has
moved, with the likely cause, before any step touches it (``check_unmoved``).

One move is harmless and is undone instead: ``.to(device)`` with a device that names the
same memory in other words (``model.to("cpu:0")`` of a CPU model, which Accelerate and the
Trainer do on CPU machines) copies every param unchanged. A param that still has its slot's
device, dtype, shape and exact values is pointed back at its slot (``readopt_unchanged``).
A checkpoint load is the other: ``optimizer.load_state_dict`` runs after the framework loaded
the model (Accelerate's ``load_state``, the Trainer's ``resume_from_checkpoint``), into those
copies or into new tensors, so there a moved param of the slot's device, dtype and shape is
taken as the model's new value: copied into its slot and pointed back (``adopt_moved``).

[Note: one storage per param]
A param is not a ``narrow`` view of the flat buffer (that would make every param of a bucket
share the flat buffer's storage) but a tensor with a storage of its own that aliases the same
memory (``alias_slot``: ``torch.from_dlpack`` of the view, whose deleter keeps the flat buffer
alive for as long as any param uses it). Save paths that find tied weights by storage
(Accelerate's ``save_model``/``save_state`` drop all but one of a "shared" group,
``safetensors.torch.save_model`` refuses it) then see each param as the sole owner of exactly
its bytes, as in a model that never met the optimizer: every save path writes every param,
``torch.save(model)`` and deep copies hold one storage per param, not the whole bucket.
Cost: nothing per step and no extra memory (the same bytes, one storage object per param).
What it gives up: a view's autograd version counter is its base's, so an in-place write into
the flat buffer bumped every param's; an aliasing storage has its own counter, so a forward
whose saved params are overwritten by a step before its backward is no longer flagged by
autograd (torch's optimizers write params in place and would be; no training loop here steps
between a forward and its backward). A device whose tensors cannot be exported through DLPack
keeps plain views, with one warning naming what that loses.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch

from .layout import BucketLayout

__all__ = ["FlatParamBuffer", "ParamMovedError", "adopt_moved", "alias_slot", "check_unmoved"]


class ParamMovedError(RuntimeError):
    """A param no longer lives in its flat buffer (see [Note: params are views])."""


_DLPACK_WARNED: set[str] = set()


def alias_slot(view: torch.Tensor) -> torch.Tensor:
    """A tensor over ``view``'s memory with a storage of its own (see [Note: one storage per param]).

    Falls back to ``view`` itself, with one warning per device type, where DLPack cannot
    export the device's tensors.
    """
    if view.numel() == 0:
        return view  # owns no memory: nothing to deduplicate
    try:
        alias = torch.from_dlpack(view)
    except (RuntimeError, BufferError, TypeError, ValueError) as exc:  # ValueError: no DLPack device code
        if view.device.type not in _DLPACK_WARNED:
            _DLPACK_WARNED.add(view.device.type)
            warnings.warn(f"ShardedFusedAdam: {view.device.type} tensors cannot be exported through DLPack "
                          f"({exc}); params stay views into one flat buffer per bucket, so save paths that "
                          "deduplicate by storage (accelerator.save_model, safetensors.torch.save_model) keep "
                          "one param per bucket. Save with model.save_pretrained or torch.save(model.state_dict())",
                          stacklevel=3)
        return view
    assert alias.data_ptr() == view.data_ptr() and alias.shape == view.shape
    return alias


class FlatParamBuffer:
    """The flat storage of one bucket and the param views into it.

    Args:
        layout: where each param sits in the buffer.
        params: the bucket's params, in ``layout.slots`` order.
        names: a human-readable name for each param (used in error messages).
    """

    def __init__(self, layout: BucketLayout, params: Sequence[torch.Tensor], names: Sequence[str]):
        assert len(params) == len(layout.slots) == len(names)
        first = params[0]
        self.layout = layout
        self.params = list(params)
        self.names = list(names)
        self.dtype = first.dtype
        self.device = first.device
        self.flat = torch.zeros(layout.padded_numel, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            for slot, p in zip(layout.slots, self.params):
                view = self.flat.narrow(0, slot.offset, slot.numel)
                view.copy_(p.detach().reshape(-1))
                p.data = alias_slot(view.view(p.shape))
        self._expected = [(p.data_ptr(), p.shape, p.stride()) for p in self.params]

    def shard(self, rank: int) -> torch.Tensor:
        """``rank``'s shard of the flat buffer (a view)."""
        start, end = self.layout.shard_range(rank)
        return self.flat.narrow(0, start, end - start)

    def moved(self) -> list[int]:
        """Slots of the params that no longer live where they were put (usually none)."""
        current = [(p.data_ptr(), p.shape, p.stride()) for p in self.params]
        if current == self._expected:
            return []
        return [pos for pos, (now, then) in enumerate(zip(current, self._expected)) if now != then]

    @torch.no_grad()
    def readopt_unchanged(self, positions: Sequence[int]) -> list[int]:
        """Point moved params that are exact copies of their slot back at it; return the others."""
        still_moved = []
        for pos in positions:
            p, slot = self.params[pos], self.layout.slots[pos]
            view = self.flat.narrow(0, slot.offset, slot.numel).view(self._expected[pos][1])
            if (p.device == self.device and p.dtype == self.dtype and p.shape == view.shape
                    and p.stride() == view.stride() and torch.equal(p.data, view)):
                p.data = alias_slot(view)
            else:
                still_moved.append(pos)
        return still_moved

    @torch.no_grad()
    def adopt(self, positions: Sequence[int]) -> list[int]:
        """Copy moved params of the slot's device, dtype and shape into their slots and point
        them back at them (their values win, see [Note: params are views]); return the others."""
        still_moved = []
        for pos in positions:
            p, slot = self.params[pos], self.layout.slots[pos]
            view = self.flat.narrow(0, slot.offset, slot.numel).view(self._expected[pos][1])
            if p.device == self.device and p.dtype == self.dtype and p.shape == view.shape:
                view.copy_(p.data)
                p.data = alias_slot(view)
            else:
                still_moved.append(pos)
        return still_moved

    def diagnose(self, pos: int, others: int = 0) -> str:
        """Why the param in slot ``pos`` moved, for a ``ParamMovedError`` message."""
        p, name = self.params[pos], self.names[pos]
        slot = self.layout.slots[pos]
        if p.device != self.device:
            cause = (f"it moved from {self.device} to {p.device}, e.g. model.cpu() or model.to(...) "
                     "after the optimizer was built")
        elif p.dtype != self.dtype:
            cause = (f"it was cast from {self.dtype} to {p.dtype}, e.g. model.half() or "
                     "model.to(dtype) after the optimizer was built")
        elif p.numel() != slot.numel or p.untyped_storage().size() == 0:
            cause = (f"its storage was replaced or freed (numel {slot.numel} -> {p.numel()}), "
                     "e.g. param.data = torch.empty(0)")
        else:
            cause = ("param.data was rebound to other memory, e.g. param.data = tensor, "
                     "param.set_(...) or a transpose assigned to .data")
        more = f" (and {others} more)" if others else ""
        return (f"{name}{more} no longer lives in the optimizer's flat buffer: {cause}. ShardedFusedAdam "
                "keeps params as views into flat buffers; move/cast the model before building "
                "the optimizer and update params in place (param.data.copy_(...)).")


def check_unmoved(buffers: Sequence[FlatParamBuffer]) -> None:
    """Raise ``ParamMovedError`` naming the first moved param of ``buffers`` and how many moved.

    Params moved by a no-op device move are pointed back at their slots first (see
    [Note: params are views]).
    """
    moved = [(buf, pos) for buf in buffers for pos in buf.readopt_unchanged(buf.moved())]
    if moved:
        buf, pos = moved[0]
        raise ParamMovedError(buf.diagnose(pos, len(moved) - 1))


def adopt_moved(buffers: Sequence[FlatParamBuffer]) -> None:
    """Before a checkpoint load: take the values of moved params that still fit their slots
    (see [Note: params are views]); other moves are left for ``check_unmoved`` to name."""
    for buf in buffers:
        buf.adopt(buf.moved())

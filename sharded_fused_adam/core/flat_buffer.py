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
"""
from __future__ import annotations

from typing import Sequence

import torch

from .layout import BucketLayout

__all__ = ["FlatParamBuffer", "ParamMovedError", "check_unmoved"]


class ParamMovedError(RuntimeError):
    """A param no longer lives in its flat buffer (see [Note: params are views])."""


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
                p.data = view.view(p.shape)
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
                p.data = view
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

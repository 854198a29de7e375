"""The format-neutral, lazily read optimizer state every converter reads into and writes from.

[Note: named optimizer state]
Each format reader returns a ``NamedState``: per parameter (keyed by its FQN, the name in
``model.named_parameters()``) the shape, the Adam step and one ``Piece``-backed ``StateTensor``
per state key (``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, fp32 ``master``/weights),
plus torch-style param groups whose ``params`` are FQNs. Nothing is read until a writer or
a loader asks for an element range, so converting streams one param range at a time.
``check_complete`` is the one place that enforces "nothing silently missing": every param of
every group must have ``exp_avg``, ``exp_avg_sq`` and a step (and ``max_exp_avg_sq`` where the
group uses amsgrad), each of its param's size, or a ``CheckpointError`` names the param and
the file before anything is loaded or written.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, Sequence

import torch

from ...kernels.rule import ADAM, MASTER_KEY
from ..sharded import CheckpointError

__all__ = ["Piece", "StateTensor", "ParamState", "NamedState", "check_complete", "HYPERPARAMETERS",
           "MOMENT_KEYS", "MASTER_KEY", "SHAPE_KEY", "CheckpointError"]

MOMENT_KEYS = ADAM.state_keys  # the update rule's per-param tensors (kernels/rule.py)
SHAPE_KEY = ADAM.moment_keys[0]  # every param with state has it, in the param's shape
# Group entries that mean the same in torch.optim.Adam, DeepSpeed and us; everything else is left behind.
HYPERPARAMETERS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "decoupled_weight_decay")
# torch.optim.Adam's implementation choices: carried through unchanged, because torch's
# load_state_dict takes them from the file (a resumed job without "fused" would run another kernel).
IMPLEMENTATION_KEYS = ("maximize", "foreach", "capturable", "differentiable", "fused")


class RangeReader(Protocol):
    def read(self, start: int, end: int, out: Optional[torch.Tensor] = None) -> torch.Tensor: ...


@dataclass(frozen=True)
class Piece:
    """Elements ``[start, end)`` of a param's flattened state live at ``source[offset:offset + end - start]``."""

    start: int
    end: int
    source: RangeReader
    offset: int = 0


@dataclass(frozen=True)
class StateTensor:
    """One state tensor of one param, as pieces of files (see [Note: named optimizer state])."""

    numel: int
    dtype: torch.dtype
    pieces: tuple[Piece, ...]
    file: str  # for messages

    def covered(self) -> bool:
        """Whether the pieces cover ``[0, numel)`` exactly, without overlap."""
        pos = 0
        for piece in sorted(self.pieces, key=lambda p: p.start):
            if piece.start != pos:
                return False
            pos = piece.end
        return pos == self.numel

    def read(self, start: int, end: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Elements ``[start, end)`` of the flattened tensor, converted to ``out``'s dtype if given."""
        out = torch.empty(end - start, dtype=self.dtype) if out is None else out
        for piece in self.pieces:
            lo, hi = max(start, piece.start), min(end, piece.end)
            if lo < hi:
                src = piece.offset + lo - piece.start
                target = out.narrow(0, lo - start, hi - lo)
                if target.dtype == self.dtype:
                    piece.source.read(src, src + hi - lo, target)
                else:
                    target.copy_(piece.source.read(src, src + hi - lo))
        return out

    @classmethod
    def whole(cls, source: Any, file: str, numel: Optional[int] = None) -> StateTensor:
        """A state tensor stored in one piece (a ``LazyTensor`` or an in-memory tensor)."""
        numel = source.numel() if numel is None else numel
        return cls(numel, source.dtype, (Piece(0, numel, _as_reader(source)),), file)


class _TensorReader:
    def __init__(self, tensor: torch.Tensor):
        self.flat = tensor.detach().reshape(-1)

    def read(self, start: int, end: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        value = self.flat[start:end]
        return value.clone() if out is None else out.copy_(value)


def _as_reader(source: Any) -> RangeReader:
    return _TensorReader(source) if isinstance(source, torch.Tensor) else source


@dataclass(frozen=True)
class ParamState:
    """What a checkpoint holds for one parameter; ``step`` is None when the file had no step for it."""

    name: str
    shape: torch.Size
    step: Optional[int]
    tensors: dict[str, StateTensor]
    file: str


@dataclass
class NamedState:
    """A whole optimizer checkpoint keyed by param FQN (see [Note: named optimizer state]).

    ``groups``: torch-style param groups (``HYPERPARAMETERS`` plus ``"params"``: FQNs).
    ``weights``: the fp32 params themselves where the format stores them (DeepSpeed's fp32
    partitions, a universal ``fp32.pt``, our ``master_param``), for writers that need them.
    ``extra``: format-specific scalars worth carrying (loss scaler, global step).
    """

    params: dict[str, ParamState]
    groups: list[dict[str, Any]]
    source: str
    weights: dict[str, StateTensor] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return sum(p.shape.numel() for p in self.params.values())

    def group_of(self) -> dict[str, int]:
        return {name: gi for gi, group in enumerate(self.groups) for name in group["params"]}


def group_hyperparameters(group: dict[str, Any]) -> dict[str, Any]:
    """The format-neutral part of a saved param group (DeepSpeed's ``adam_w_mode`` read as torch's flag)."""
    hyper = {k: group[k] for k in HYPERPARAMETERS + IMPLEMENTATION_KEYS if k in group}
    if "betas" in hyper:
        hyper["betas"] = tuple(float(b) for b in hyper["betas"])
    if "decoupled_weight_decay" not in hyper and "adam_w_mode" in group:
        hyper["decoupled_weight_decay"] = bool(group["adam_w_mode"])
    return hyper


def check_complete(state: NamedState, expected: Optional[Sequence[str]] = None) -> None:
    """Raise unless every param has its moments and step, of the right size (rule of the module note).

    Args:
        state: what a reader found.
        expected: the FQNs the target needs; each must be in ``state`` and vice versa.

    Raises:
        CheckpointError: naming the param, what is missing or mismatched, and the file.
    """
    group_of = state.group_of()
    for name, param in state.params.items():
        if name not in group_of:
            raise CheckpointError(f"{param.file}: param {name!r} has state but belongs to no param group")
        amsgrad = bool(state.groups[group_of[name]].get("amsgrad", False))
        for key in ADAM.keys_for({"amsgrad": amsgrad}):
            if key not in param.tensors:
                raise CheckpointError(f"{param.file}: param {name!r} has no {key!r} (found {sorted(param.tensors)})")
        if param.step is None:
            raise CheckpointError(f"{param.file}: param {name!r} has no step")
        for key, tensor in param.tensors.items():
            if tensor.numel != param.shape.numel() or not tensor.covered():
                raise CheckpointError(f"{tensor.file}: {key} of param {name!r} holds {tensor.numel} elements in "
                                      f"{len(tensor.pieces)} pieces that do not cover the param's "
                                      f"{param.shape.numel()} (shape {tuple(param.shape)}) exactly")
    for gi, group in enumerate(state.groups):
        missing = [n for n in group["params"] if n not in state.params]
        if missing:
            raise CheckpointError(f"{state.source}: param group {gi} lists params without state: {missing[:5]}")
    if expected is not None:
        absent = [n for n in expected if n not in state.params]
        extra = [n for n in state.params if n not in set(expected)]
        if absent:
            raise CheckpointError(f"{state.source} has no optimizer state for params {absent[:5]} "
                                  f"({len(absent)} in all); it has {len(state.params)} params")
        if extra:
            raise CheckpointError(f"{state.source} has state for params the model does not have: {extra[:5]}")

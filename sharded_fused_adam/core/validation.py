"""Checks of user input at construction: hyperparameters, torch's flags, params and param groups.

Every failure names the argument (or the param), the rule and the value, and happens
before the optimizer touches any tensor, so a rejected call leaves the model untouched.

[Note: torch's implementation flags]
``torch.optim.Adam`` takes ``foreach``, ``fused``, ``capturable`` and ``differentiable`` to
choose among its implementations. Ours is always one fused kernel over flat shards (chosen
by ``kernel=``), so code written for torch passes them here and they mean:
``fused=None/True`` and ``foreach=None/False``: nothing to do; ``foreach=True`` or
``fused=False``: accepted with a warning (torch would run its multi-tensor or per-param loop;
results then differ from it by rounding only); both True: torch's RuntimeError.
``capturable=True`` (CUDA-graph capture of ``step()``) and ``differentiable=True`` (autograd
through ``step()``) raise ``NotImplementedError`` (a RuntimeError, the type torch's fused
Adam raises for ``differentiable``): a step reads overflow flags on the host and issues
collectives, and the kernel updates flat shards in place. The flags are accepted per param
group too, and every group carries all four as torch's do (``add_torch_flags``): the value
the group was given, else torch's default, except ``fused``, which says what runs here
(True with the ``torch_fused`` kernel, as ``state_dict()`` writes it; torch's None with the
others). They are never loaded from a state dict (they describe how torch ran, not the math). Tensor ``lr`` and
``betas`` follow torch's rules (1 element; both betas tensors or neither; not with
``foreach=True``). ``maximize`` and ``decoupled_weight_decay`` are math, live in every group
and are checkpointed.

[Note: aliased params]
Every param becomes a view into a flat buffer, which cannot hold the same memory twice, so
two params may not overlap in memory. The check compares the byte ranges the params span,
not their storages: params that are disjoint views of one storage are fine. That case is
common: after an optimizer is gone, its model's params are still views into its old flat
buffer, and a new optimizer over them must work (torch's optimizers allow it). A param that
a live optimizer still holds in its buckets is refused instead (``owner_of``), naming that
optimizer: building a second one would re-point the params and silently detach the first.
"""
from __future__ import annotations

import bisect
import math
import warnings
from dataclasses import dataclass, field
from numbers import Real
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

__all__ = ["ParamRegistry", "adam_defaults", "add_torch_flags", "check_hyperparameters", "check_torch_flags",
           "check_params", "SUPPORTED_DTYPES", "TORCH_IMPLEMENTATION_FLAGS"]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# torch.optim.Adam's implementation switches, with torch's defaults (see [Note: torch's implementation flags]).
TORCH_IMPLEMENTATION_FLAGS: Mapping[str, Optional[bool]] = {
    "foreach": None, "fused": None, "capturable": False, "differentiable": False}


def _number(name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element, got shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _bool(name: str, value: Any, *, allow_none: bool = False, suffix: str = "") -> None:
    if not (isinstance(value, bool) or (allow_none and value is None)):
        kind = "a bool or None" if allow_none else "a bool"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__} {value!r}{suffix}")


def adam_defaults(
    lr: Any,
    betas: Any,
    eps: Any,
    weight_decay: Any,
    amsgrad: Any,
    adamw: Any,
    *,
    maximize: Any = False,
    decoupled_weight_decay: Any = False,
    foreach: Any = None,
    fused: Any = None,
    capturable: Any = False,
    differentiable: Any = False,
) -> dict:
    """The optimizer defaults dict (torch.optim.Adam's math keys), validated.

    Takes every keyword of ``torch.optim.Adam.__init__``; ``adamw`` and torch's
    ``decoupled_weight_decay`` both ask for decoupled decay. The implementation flags are
    checked (see [Note: torch's implementation flags]) but not returned.

    Raises:
        TypeError: a hyperparameter or flag of the wrong type.
        ValueError: a value out of range, or a tensor ``lr``/``betas`` torch refuses.
        NotImplementedError: ``capturable=True`` or ``differentiable=True``.
        RuntimeError: ``foreach=True`` together with ``fused=True``.
    """
    _bool("adamw", adamw)
    _bool("decoupled_weight_decay", decoupled_weight_decay)
    defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                    maximize=maximize, decoupled_weight_decay=adamw or decoupled_weight_decay)
    check_hyperparameters(defaults)
    check_torch_flags(dict(foreach=foreach, fused=fused, capturable=capturable, differentiable=differentiable),
                      lr=lr, betas=betas)
    return defaults


def add_torch_flags(groups: Sequence[dict], kernel_name: str) -> None:
    """Give each param group torch.optim.Adam's implementation keys it lacks (see
    [Note: torch's implementation flags]): code written for torch reads ``group["fused"]``."""
    flags = {**TORCH_IMPLEMENTATION_FLAGS, "fused": True if kernel_name == "torch_fused" else None}
    for group in groups:
        for key, value in flags.items():
            group.setdefault(key, value)


def check_hyperparameters(group: dict, where: str = "") -> None:
    """Validate one param group's Adam hyperparameters (torch's ranges) and any torch flags it carries.

    Raises:
        TypeError: a hyperparameter of the wrong type.
        ValueError: a value out of range or not finite.
        NotImplementedError, RuntimeError: see ``check_torch_flags``.
    """
    suffix = f" ({where})" if where else ""
    lr = _number("lr", group["lr"])
    if lr < 0:
        raise ValueError(f"lr must be >= 0, got {lr}{suffix}")
    eps = _number("eps", group["eps"])
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}{suffix}")
    wd = _number("weight_decay", group["weight_decay"])
    if wd < 0:
        raise ValueError(f"weight_decay must be >= 0, got {wd}{suffix}")
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair of floats, got {betas!r}{suffix}")
    for i, beta in enumerate(betas):
        b = _number(f"betas[{i}]", beta)
        if not 0.0 <= b < 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {b}{suffix}")
    if isinstance(betas[0], torch.Tensor) != isinstance(betas[1], torch.Tensor):
        raise ValueError(f"betas must be either both floats or both Tensors, got "
                         f"({type(betas[0]).__name__}, {type(betas[1]).__name__}){suffix}")
    for flag in ("amsgrad", "decoupled_weight_decay", "maximize"):
        _bool(flag, group[flag], suffix=suffix)
    carried = {k: group[k] for k in TORCH_IMPLEMENTATION_FLAGS if k in group}
    if carried:
        check_torch_flags(carried, lr=group["lr"], betas=betas, where=where)


def check_torch_flags(flags: Mapping[str, Any], *, lr: Any, betas: Any, where: str = "") -> None:
    """Validate torch.optim.Adam's implementation flags (see [Note: torch's implementation flags]).

    Args:
        flags: some or all of ``foreach``, ``fused``, ``capturable``, ``differentiable``;
            a missing one takes torch's default.
        lr, betas: the hyperparameters they apply to (torch refuses tensors with ``foreach``).
        where: what the flags belong to, for messages (e.g. ``"param group 1"``).

    Raises:
        TypeError: a flag that is not a bool (``foreach``/``fused``: or None).
        ValueError: a tensor ``lr`` or ``betas`` with ``foreach=True``, as torch.
        NotImplementedError: ``capturable=True`` or ``differentiable=True``.
        RuntimeError: ``foreach=True`` together with ``fused=True``, as torch.
    """
    suffix = f" ({where})" if where else ""
    unknown = set(flags) - set(TORCH_IMPLEMENTATION_FLAGS)
    assert not unknown, unknown
    f = {**TORCH_IMPLEMENTATION_FLAGS, **flags}
    for name in ("foreach", "fused"):
        _bool(name, f[name], allow_none=True, suffix=suffix)
    for name in ("capturable", "differentiable"):
        _bool(name, f[name], suffix=suffix)
    if f["foreach"]:
        tensors = [n for n, v in (("lr", lr), ("betas[0]", betas[0]), ("betas[1]", betas[1]))
                   if isinstance(v, torch.Tensor)]
        if tensors:
            raise ValueError(f"{tensors[0]} as a Tensor is not supported for capturable=False and "
                             f"foreach=True (torch.optim.Adam's rule; pass a float){suffix}")
    if f["capturable"]:
        raise NotImplementedError(
            f"capturable=True (capturing step() in a CUDA graph) is not supported{suffix}: a step reads "
            "the overflow flag on the host and issues collectives; capture the forward and backward only")
    if f["differentiable"]:
        raise NotImplementedError(
            f"differentiable=True (autograd through step()) is not supported{suffix}: the update is one "
            "fused kernel working in place on flat shards, and torch.optim.Adam(fused=True) refuses it too")
    if f["foreach"] and f["fused"]:
        raise RuntimeError(f"`fused` and `foreach` cannot be `True` together{suffix}")
    if f["foreach"] or f["fused"] is False:
        asked = "foreach=True" if f["foreach"] else "fused=False"
        warnings.warn(f"{asked} asks torch.optim.Adam for a non-fused implementation{suffix}; this "
                      "optimizer always runs its fused kernel (see kernel=), whose results equal "
                      "torch.optim.Adam(fused=True)'s and differ from the non-fused ones by rounding only",
                      UserWarning, stacklevel=4)



def _memory_span(p: torch.Tensor) -> tuple[int, int]:
    """``[first byte, last byte + 1)`` of the memory ``p``'s elements occupy (strides are >= 0)."""
    last = sum((size - 1) * stride for size, stride in zip(p.shape, p.stride()))
    start = p.data_ptr()
    return start, start + (last + 1) * p.element_size()


@dataclass
class ParamRegistry:
    """The params an optimizer accepted so far: by identity, their memory spans (sorted, disjoint)
    and their one device (see [Note: aliased params])."""

    by_id: dict[int, str] = field(default_factory=dict)
    spans: list[tuple[int, int, str]] = field(default_factory=list)
    device: Optional[torch.device] = None
    first_name: str = ""

    def __bool__(self) -> bool:
        return bool(self.by_id)

    def overlapping(self, span: tuple[int, int]) -> Optional[str]:
        """The name of a registered param whose memory overlaps ``span``, or None."""
        at = bisect.bisect_right(self.spans, (span[0], float("inf"), ""))
        before = self.spans[at - 1] if at else None
        after = self.spans[at] if at < len(self.spans) else None
        if before is not None and before[1] > span[0]:
            return before[2]
        if after is not None and after[0] < span[1]:
            return after[2]
        return None


def _live_owner_error(name: str, owner: Any) -> ValueError:
    held = sum(len(g["params"]) for g in owner.param_groups)
    return ValueError(f"{name} is already sharded by another live {type(owner).__name__} (object at {id(owner):#x}, "
                      f"{held} params in {len(owner.param_groups)} param groups): a param can belong to one live "
                      "ShardedFusedAdam at a time, because each makes its params views into its own flat buffer "
                      "and building this one would silently detach them from the first. Delete the first "
                      "(`del opt; gc.collect()`) before building this one, or put every param group into one "
                      "optimizer")


def check_params(params: Sequence[torch.Tensor], names: Sequence[str], registry: ParamRegistry,
                 owner_of: Optional[Callable[[torch.Tensor], Any]] = None) -> None:
    """Validate params against each other and against those already in ``registry``.

    ``registry`` is owned by the caller and grows with every accepted param; it is only
    updated once the whole sequence passed, so a rejected group leaves it unchanged.

    Args:
        params, names: the params of one group and their names for messages.
        registry: what the optimizer accepted so far.
        owner_of: returns the live optimizer that holds a param, or None (see
            [Note: aliased params]).

    Raises:
        TypeError: a param that is not a floating-point tensor of a supported dtype.
        ValueError: a non-leaf, sparse, duplicated or overlapping param, one a live
            optimizer holds, or params on different devices.
    """
    new = ParamRegistry(dict(registry.by_id), list(registry.spans), registry.device, registry.first_name)
    for p, name in zip(params, names):
        if p.is_sparse or p.layout != torch.strided:
            raise ValueError(f"{name} has layout {p.layout}; only dense (strided) params can be sharded")
        if p.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {p.dtype}; ShardedFusedAdam supports "
                            f"{', '.join(str(d) for d in SUPPORTED_DTYPES)}")
        if not p.is_leaf:
            raise ValueError(f"{name} is not a leaf tensor (it was computed from other tensors); "
                             "pass the original parameters")
        if new.device is None:
            new.device, new.first_name = p.device, name
        elif p.device != new.device:
            raise ValueError(f"all params must be on one device (one device per rank), got "
                             f"{new.device} ({new.first_name}) and {p.device} ({name})")
        other, what = new.by_id.get(id(p)), "is the same tensor as"
        span = _memory_span(p)
        if other is None and p.numel():  # empty tensors own no memory (their data pointers may coincide)
            other, what = new.overlapping(span), "overlaps the memory range of"
        if other is not None:
            raise ValueError(f"{name} {what} {other}: each param may appear only once across all param "
                             "groups, and params may not overlap in memory, because every param becomes a "
                             "view into one flat buffer, which cannot hold the same memory twice "
                             "(torch.optim.Adam only warns about a duplicate)")
        owner = owner_of(p) if owner_of is not None else None
        if owner is not None:
            raise _live_owner_error(name, owner)
        new.by_id[id(p)] = name
        if p.numel():
            bisect.insort(new.spans, (*span, name))
    registry.by_id, registry.spans = new.by_id, new.spans
    registry.device, registry.first_name = new.device, new.first_name

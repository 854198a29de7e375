"""The Adam update rule: the state it keeps, its hyperparameters' checks and its kernel call, in one place.

[Note: the update rule]
Everything that makes this optimizer Adam (rather than, say, Lion) lives here: the names of the
per-param state tensors (torch.optim.Adam's, so checkpoints interoperate), which of them a param
group asks for (``max_exp_avg_sq`` only with ``amsgrad``), the hyperparameters and their ranges,
and the scalars a kernel of ``kernels/`` is called with. Buckets, every checkpoint format and
the converters read the key set from ``ADAM``; none of them spells a key. ``MASTER_KEY`` names
the fp32 master weights a checkpoint holds for fp16/bf16 params: that is storage, not math, but
checkpoints list it beside the rule's keys, so it is named here too.

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
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from numbers import Real
from typing import Any, Mapping, Optional, Sequence

import torch

__all__ = ["ADAM", "MASTER_KEY", "UpdateRule", "adam_defaults", "add_torch_flags", "check_hyperparameters",
           "check_torch_flags", "TORCH_IMPLEMENTATION_FLAGS"]

MASTER_KEY = "master_param"
# torch.optim.Adam's implementation switches, with torch's defaults (see [Note: torch's implementation flags]).
TORCH_IMPLEMENTATION_FLAGS: Mapping[str, Optional[bool]] = {
    "foreach": None, "fused": None, "capturable": False, "differentiable": False}


@dataclass(frozen=True)
class UpdateRule:
    """What an update rule keeps per param, and how a param group turns into kernel arguments.

    Attributes:
        name: the rule's name (``"adam"``).
        moment_keys: state tensors every param with state has, in the param's shape.
        optional_keys: ``(key, group flag)`` pairs: the state tensor exists where the flag is set.
    """

    name: str
    moment_keys: tuple[str, ...]
    optional_keys: tuple[tuple[str, str], ...]

    @property
    def state_keys(self) -> tuple[str, ...]:
        """Every per-param state tensor the rule may keep (``step`` aside), in a fixed order."""
        return self.moment_keys + tuple(key for key, _ in self.optional_keys)

    @property
    def checkpoint_keys(self) -> tuple[str, ...]:
        """``state_keys`` plus the fp32 master a checkpoint may hold (see [Note: the update rule])."""
        return self.state_keys + (MASTER_KEY,)

    def keys_for(self, group: Mapping[str, Any]) -> tuple[str, ...]:
        """The state tensors a param of ``group`` has once it took a step."""
        return self.moment_keys + tuple(key for key, flag in self.optional_keys if group.get(flag))

    def kernel_scalars(self, group: Mapping[str, Any]) -> dict[str, Any]:
        """The keyword scalars a kernel's ``adam_step`` takes for ``group`` (see kernels/__init__.py)."""
        return dict(lr=float(group["lr"]), beta1=float(group["betas"][0]), beta2=float(group["betas"][1]),
                    eps=float(group["eps"]), weight_decay=float(group["weight_decay"]),
                    amsgrad=bool(group["amsgrad"]), decoupled=bool(group["decoupled_weight_decay"]),
                    maximize=bool(group["maximize"]))


ADAM = UpdateRule("adam", moment_keys=("exp_avg", "exp_avg_sq"), optional_keys=(("max_exp_avg_sq", "amsgrad"),))


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

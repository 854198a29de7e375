"""Checks that run torch's own Adam/AdamW test inputs against ours, in one process or on a rank.

tests/test_torch_optim_db.py reads the inputs from ``torch.testing._internal.common_optimizers``
and hands them here as plain data; this module does not import that package, so a rank
forked by the harness does not pay for it (about 2.5 s). See [Note: torch's implementation
flags] in sharded_fused_adam/core/validation.py for what each flag means here.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from sharded_fused_adam import ShardedFusedAdam, ShardedFusedAdamW

from helpers import batch, loss_fn, make_net

PAIRS = {"Adam": (torch.optim.Adam, ShardedFusedAdam), "AdamW": (torch.optim.AdamW, ShardedFusedAdamW)}


@dataclass(frozen=True)
class Difference:
    """A torch input on which we deliberately do not do what torch does."""

    torch_does: str
    raises: type
    message: str  # a fragment of our message, which says why
    why: str


# The one list of deliberate differences (docs/migrating.md shows it; a test keeps the two in step).
# Keys: the ``desc`` of one of torch's error inputs, or ``flag=value`` for any input carrying it.
DELIBERATE_DIFFERENCES = {
    "a param group cannot have duplicate parameters": Difference(
        "warns (UserWarning) and updates the param once", ValueError, "cannot hold the same memory twice",
        "every parameter becomes a view into one flat buffer, which cannot hold the same memory twice"),
    "capturable=True": Difference(
        "captures step() in a CUDA graph (CUDA only)", NotImplementedError, "capturable=True",
        "a step reads the overflow flag on the host and issues collectives"),
    "differentiable=True": Difference(
        "runs autograd through step() (not with fused=True)", NotImplementedError, "differentiable=True",
        "the update is one fused kernel working in place on flat shards"),
}


def deliberate_difference(desc: str, kwargs: dict) -> Optional[tuple[str, Difference]]:
    """The listed difference this input hits, if any, with its key."""
    keys = [desc] + [f"{k}={v!r}" for k, v in kwargs.items() if isinstance(v, bool)]
    return next(((k, DELIBERATE_DIFFERENCES[k]) for k in keys if k in DELIBERATE_DIFFERENCES), None)


def oracle_kwargs(kwargs: dict) -> tuple[dict, bool]:
    """torch's kwargs for the oracle, and whether its arithmetic is identical to ours.

    An input that leaves the implementation to torch (or asks for ``fused=True``) is
    compared with ``fused=True``: the same op as our default kernel, so bit for bit.
    ``foreach=True`` or ``fused=False`` make torch run its multi-tensor or for-loop code
    (ours stays fused), which rounds differently: compared within torch's own tolerance.
    """
    if kwargs.get("foreach") or kwargs.get("fused") is False:
        return dict(kwargs), False
    return {**kwargs, "fused": True}, True


def assert_same(ours: list[torch.Tensor], theirs: list[torch.Tensor], bitwise: bool, what: str) -> None:
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if bitwise:
            assert torch.equal(a, b), f"{what}: param {i} differs by {(a - b).abs().max().item()}"
        else:
            # torch's test_fused_matches_forloop compares fused with for-loop Adam at
            # assert_close's float32 defaults (rtol 1.3e-6, atol 1e-5); so do we.
            torch.testing.assert_close(a, b, msg=lambda m: f"{what}: param {i}: {m}")


def _params(model: torch.nn.Module, groups: str, kwargs: dict) -> Any:
    """``"one"``: one group; ``"two"``: per-group lr and weight_decay, and the second group
    flips ``maximize`` and carries torch's implementation flags, as a torch user may write."""
    if groups == "one":
        return list(model.parameters())
    weights = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2]
    others = [p for n, p in model.named_parameters() if not (n.endswith("weight") and p.dim() == 2)]
    return [{"params": weights, "lr": 3e-3, "weight_decay": 0.05},
            {"params": others, "weight_decay": 0.0, "maximize": not kwargs.get("maximize", False),
             "foreach": None, "fused": True, "capturable": False, "differentiable": False}]


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int, rank: int, scheds: list = ()) -> None:
    opt.zero_grad()
    loss = loss_fn(model, *batch(step, rank, same_on_all_ranks=True))
    loss.backward()
    opt.step()
    for s in scheds:
        if isinstance(s, torch.optim.lr_scheduler.ReduceLROnPlateau):
            s.step(loss.item())
        else:
            s.step()


def parity(name: str, kwargs: dict, *, rank: int = 0, steps: int = 5, groups: str = "one",
           schedulers: tuple[Callable, ...] = ()) -> None:
    """Train ours and torch's optimizer side by side on the same gradients (every rank feeds
    the same batch, so the averaged gradient is exact) and compare after every step."""
    torch_cls, ours_cls = PAIRS[name]
    model = make_net()
    ref = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # foreach=True / fused=False: see validation.py
        opt = ours_cls(_params(model, groups, kwargs), **kwargs)
    ref_kwargs, bitwise = oracle_kwargs(kwargs)
    ref_opt = torch_cls(_params(ref, groups, kwargs), **ref_kwargs)
    scheds = [[make(o) for make in schedulers] for o in (opt, ref_opt)]
    for step in range(steps):
        _train(model, opt, step, rank, scheds[0])
        _train(ref, ref_opt, step, rank, scheds[1])
        assert_same([p.detach() for p in model.parameters()], [p.detach() for p in ref.parameters()], bitwise,
                    f"{name}({kwargs}) step {step + 1}")
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ref_opt.param_groups]


def state_dict_round_trips(name: str, kwargs: dict, *, rank: int = 0) -> None:
    """Ours -> ours, ours -> torch and torch -> ours (torch's dict carries maximize etc.)
    mid-training, each continued beside an uninterrupted run: bit for bit. Only for inputs
    whose arithmetic is torch's (torch's moments must equal ours when they are swapped)."""
    torch_cls, ours_cls = PAIRS[name]
    ref_kwargs, bitwise = oracle_kwargs(kwargs)
    assert bitwise, kwargs
    model = make_net()
    opt = ours_cls(model.parameters(), **kwargs)
    ref = copy.deepcopy(model)
    ref_opt = torch_cls(ref.parameters(), **ref_kwargs)
    for step in range(3):
        _train(model, opt, step, rank)
        _train(ref, ref_opt, step, rank)
    ours_sd, torch_sd = opt.state_dict(), ref_opt.state_dict()
    defaults = {k: v for k, v in kwargs.items() if k not in ("maximize", "weight_decay", "amsgrad", "lr")}
    resumed = []  # (model, optimizer) continued from a loaded dict
    for sd, cls, extra in ((ours_sd, ours_cls, defaults), (torch_sd, ours_cls, defaults),
                           (ours_sd, torch_cls, {"fused": True})):
        m = copy.deepcopy(model)
        o = cls(m.parameters(), **extra)  # built with default hyperparameters: the dict restores them
        o.load_state_dict(copy.deepcopy(sd))
        resumed.append((m, o))
    for step in range(3, 5):
        _train(model, opt, step, rank)
        for m, o in resumed:
            _train(m, o, step, rank)
    for (m, o), what in zip(resumed, ("ours -> ours", "torch -> ours", "ours -> torch")):
        assert o.param_groups[0]["maximize"] == kwargs.get("maximize", False), what
        assert_same([p.detach() for p in m.parameters()], [p.detach() for p in model.parameters()], True,
                    f"{name}({kwargs}) {what}")


def older_state_dicts_load(name: str, kwargs: dict) -> None:
    """torch's checks that a dict from before ``maximize``/``foreach``/... existed, with plain
    float steps, still loads: into ours and into torch, both then continue alike."""
    torch_cls, ours_cls = PAIRS[name]
    ref_kwargs, bitwise = oracle_kwargs(kwargs)
    assert bitwise, kwargs
    model = make_net()
    ref_opt = torch_cls(model.parameters(), **ref_kwargs)
    for step in range(3):
        _train(model, ref_opt, step, 0)
    old = copy.deepcopy(ref_opt.state_dict())
    for group in old["param_groups"]:
        for key in ("maximize", "foreach", "capturable", "differentiable"):  # "fused" stays: torch's kernel
            del group[key]
    for entry in old["state"].values():
        entry["step"] = float(entry["step"])
    runs = []
    for cls in (ours_cls, torch_cls):
        m = copy.deepcopy(model)
        o = cls(m.parameters())
        o.load_state_dict(copy.deepcopy(old))
        assert o.param_groups[0]["maximize"] is False
        runs.append((m, o))
    for step in range(3, 5):
        for m, o in runs:
            _train(m, o, step, 0)
    assert_same(*[[p.detach() for p in m.parameters()] for m, _ in runs], True, f"{name}({kwargs}) older dict")


def raised(cls: type, params: Any, kwargs: dict) -> Optional[BaseException]:
    """What constructing ``cls(params, **kwargs)`` raised, else the first UserWarning, else None."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            cls(params, **kwargs)
        except Exception as exc:
            return exc
    return next((w.message for w in caught if issubclass(w.category, UserWarning)), None)


def error_outcome(name: str, desc: str, params: Any, kwargs: dict, error_type: type) -> str:
    """Check one of torch's error inputs against ours; return "same" or the difference's key.

    Ours must raise ``error_type`` (an instance of it) unless the input hits a listed
    deliberate difference, in which case it must raise that entry's type and message.
    """
    torch_cls, ours_cls = PAIRS[name]
    if params is None:
        # torch's inputs pass params=None where its constructor fails on a hyperparameter
        # before reading params; ours reads params first, so give it a real one.
        params = [torch.nn.Parameter(torch.randn(1, 1))]
    theirs = raised(torch_cls, copy.deepcopy(params), kwargs)
    assert isinstance(theirs, error_type), f"torch on {desc!r}: expected {error_type.__name__}, got {theirs!r}"
    ours = raised(ours_cls, copy.deepcopy(params), kwargs)
    hit = deliberate_difference(desc, kwargs)
    if hit is not None:
        key, diff = hit
        assert isinstance(ours, diff.raises) and diff.message in str(ours), \
            f"{name} on {desc!r}: listed as {key!r} ({diff.raises.__name__}: {diff.message}), got {ours!r}"
        return key
    assert isinstance(ours, error_type), f"{name} on {desc!r}: torch raises {error_type.__name__}, ours {ours!r}"
    return "same"


def expected_error(name: str, kwargs: dict) -> None:
    """An optimizer input that hits a listed difference: ours refuses it with the listed error."""
    key, diff = deliberate_difference("", kwargs)
    ours = raised(PAIRS[name][1], list(make_net().parameters()), kwargs)
    assert isinstance(ours, diff.raises) and diff.message in str(ours), f"{name}({kwargs}): {ours!r}"


def check_all_on_rank(rank: int, world_size: int, name: str, inputs: list, base: list, errors: list) -> list:
    """Every check above, on one of ``world_size`` ranks; returns the error inputs' outcomes."""
    for _, kwargs in inputs:
        if deliberate_difference("", kwargs):
            expected_error(name, kwargs)
        else:
            parity(name, kwargs, rank=rank)
    for _, kwargs in base:
        parity(name, kwargs, rank=rank, groups="two")
        state_dict_round_trips(name, kwargs, rank=rank)
    return [error_outcome(name, *e) for e in errors]

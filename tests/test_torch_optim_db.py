"""torch's own Adam/AdamW test inputs against ShardedFusedAdam/ShardedFusedAdamW.

The inputs are torch's ``OptimizerInfo`` entries (``optim_db`` in
``torch.testing._internal.common_optimizers``, which needs ``expecttest``): the optimizer
inputs (including the foreach/fused/differentiable variants torch's suite derives), the
capturable inputs torch runs on CUDA, the LR-scheduler combinations it lists for Adam, and
the construction-error inputs. Each runs at world size 1 (no process group) and on 2 gloo
ranks against the torch optimizer in the same loop; what the checks are is in
tests/optim_db_checks.py. Importing torch's module also forbids assigning torch.backends
flags in this process (``disable_global_flags``), which nothing in the suite does.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch.testing._internal.common_optimizers import (OptimizerErrorEnum,
                                                       _get_optim_inputs_including_global_cliquey_kwargs,
                                                       optim_db)

from optim_db_checks import (DELIBERATE_DIFFERENCES, PAIRS, check_all_on_rank, deliberate_difference,
                             error_outcome, expected_error, older_state_dicts_load, parity,
                             state_dict_round_trips)

DOCS = Path(__file__).resolve().parent.parent / "docs" / "migrating.md"
INFOS = {info.name: info for info in optim_db if info.name in PAIRS}
assert set(INFOS) == set(PAIRS), f"optim_db has no entry for {set(PAIRS) - set(INFOS)}"

# torch lists these two for CUDA only, but its fused CPU path raises the same: checked on CPU.
EXTRA_ERROR_INPUTS = [
    ("`fused` and `foreach` cannot be `True` together", {"foreach": True, "fused": True}, RuntimeError),
    ("`fused` does not support `differentiable`", {"fused": True, "differentiable": True}, RuntimeError),
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: a second intra-op thread only waits for the other core (25x slower when loaded).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _inputs(name: str) -> list[tuple[str, dict]]:
    """torch's CPU optimizer inputs with the fused/differentiable variants its suite derives on
    CPU, plus the foreach variants it derives on CUDA only (torch's foreach code runs on CPU too)."""
    info = INFOS[name]
    derived = [(o.desc, o.kwargs) for o in _get_optim_inputs_including_global_cliquey_kwargs("cpu", torch.float32, info)]
    flags = {"foreach": False, "fused": False, "differentiable": False}
    foreach = [(f"{o.desc} & foreach", {**o.kwargs, **flags, "foreach": True}) for o in info.optim_inputs_func("cpu")]
    assert not any(d.endswith("& foreach") for d, _ in derived), "torch now derives foreach on CPU: drop ours"
    return derived + foreach


def _base_inputs(name: str) -> list[tuple[str, dict]]:
    return [(o.desc, o.kwargs) for o in INFOS[name].optim_inputs_func("cpu")]


def _capturable_inputs(name: str) -> list[tuple[str, dict]]:
    return [(o.desc, o.kwargs) for o in INFOS[name].optim_inputs_func("cuda") if o.kwargs.get("capturable")]


def _error_inputs(name: str) -> list[tuple]:
    """(desc, params, kwargs, error_type) of torch's construction-error inputs, plus the extras."""
    errors = INFOS[name].optim_error_inputs_func(device="cpu", dtype=torch.float32)
    assert all(e.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR for e in errors)
    out = [(e.optimizer_error_input.desc, e.optimizer_error_input.params, e.optimizer_error_input.kwargs,
            e.error_type) for e in errors]
    return out + [(desc, None, kwargs, exc) for desc, kwargs, exc in EXTRA_ERROR_INPUTS]


def _cases(fn) -> list:
    return [pytest.param(name, *case, id=f"{name}-{i}-{case[0]}") for name in PAIRS for i, case in enumerate(fn(name))]


@pytest.mark.parametrize("name,desc,kwargs", _cases(_inputs))
def test_torch_optimizer_inputs_match_torch_in_the_same_loop(name, desc, kwargs):
    if deliberate_difference(desc, kwargs):
        expected_error(name, kwargs)
    else:
        parity(name, kwargs)


@pytest.mark.parametrize("name,desc,kwargs", _cases(_base_inputs))
def test_torch_optimizer_inputs_with_param_groups_carrying_torch_keys(name, desc, kwargs):
    parity(name, kwargs, groups="two")


@pytest.mark.parametrize("name,desc,kwargs", _cases(_base_inputs))
def test_state_dicts_round_trip_with_torch_mid_training(name, desc, kwargs):
    state_dict_round_trips(name, kwargs)


@pytest.mark.parametrize("name,desc,kwargs", _cases(_base_inputs))
def test_older_torch_state_dicts_with_float_steps_load(name, desc, kwargs):
    older_state_dicts_load(name, kwargs)


@pytest.mark.parametrize("name,index", [(name, i) for name in PAIRS for i in range(len(INFOS[name].scheduler_inputs))])
def test_torch_lr_scheduler_inputs_drive_both_optimizers_alike(name, index):
    parity(name, {"weight_decay": 0.1}, steps=12, schedulers=tuple(INFOS[name].scheduler_inputs[index]))


@pytest.mark.parametrize("name,desc,kwargs", _cases(_capturable_inputs))
def test_torch_capturable_inputs_are_refused_clearly(name, desc, kwargs):
    expected_error(name, kwargs)


@pytest.mark.parametrize("name,desc,params,kwargs,error_type", _cases(_error_inputs))
def test_torch_error_inputs_raise_torchs_type_or_a_listed_difference(name, desc, params, kwargs, error_type):
    error_outcome(name, desc, params, kwargs, error_type)


@pytest.mark.parametrize("name", list(PAIRS))
def test_every_input_on_two_gloo_ranks(ranks, name):
    errors = _error_inputs(name)
    outcomes = ranks(check_all_on_rank, 2, name, _inputs(name), _base_inputs(name), errors, timeout_s=240)
    assert outcomes[0] == outcomes[1]
    assert len(outcomes[0]) == len(errors)


def test_the_deliberate_differences_are_the_ones_hit_and_the_docs_list_them():
    hit = {deliberate_difference(desc, kwargs)[0] for name in PAIRS
           for fn in (_inputs, _capturable_inputs) for desc, kwargs in fn(name) if deliberate_difference(desc, kwargs)}
    hit |= {deliberate_difference(e[0], e[2])[0] for name in PAIRS for e in _error_inputs(name)
            if deliberate_difference(e[0], e[2])}
    assert hit == set(DELIBERATE_DIFFERENCES), "a listed difference no torch input hits (stale entry?)"
    text = DOCS.read_text()
    table = text[text.index("<!-- torch-differences -->"):text.index("<!-- /torch-differences -->")]
    rows = re.findall(r"^\| `([^`]+)` \|(.*)$", table, flags=re.M)
    assert {key for key, _ in rows} == set(DELIBERATE_DIFFERENCES), "docs/migrating.md's table and the list differ"
    for key, rest in rows:
        diff = DELIBERATE_DIFFERENCES[key]
        assert f"`{diff.raises.__name__}`" in rest and diff.why in rest, f"docs row {key!r} differs from the list"

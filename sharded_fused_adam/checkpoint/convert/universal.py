"""DeepSpeed universal checkpoints (``ds_to_universal`` output) to and from a ``NamedState``.

[Note: universal checkpoint layout]
Read from DeepSpeed 0.19.8 ``checkpoint/ds_to_universal.py`` and ``checkpoint/universal_checkpoint.py``::

    <root>/latest_universal              the tag folder's name
    <root>/<tag>/mp_rank_00_model_states.pt   copied from the engine checkpoint (param_shapes, global_steps)
    <root>/<tag>/zero/optimizer_state.pt      the optimizer's non-partitioned state plus "param_groups"
    <root>/<tag>/zero/<FQN>/fp32.pt, exp_avg.pt, exp_avg_sq.pt   {"param": whole tensor, "cat_dim": 0}
    <root>/<tag>/zero/<FQN>/step.pt           the step (a tensor or an int), not wrapped

Every file is one whole parameter, so it has no world size: DeepSpeed (``"checkpoint":
{"load_universal": true}``) and we both load it at any. A folder with only ``fp32.pt`` is a
buffer or frozen param (no optimizer state).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

from .deepspeed import checkpoint_folder, step_value
from .deepspeed_write import DS_VERSION_WRITTEN, model_states
from .state import MOMENT_KEYS, CheckpointError, NamedState, ParamState, StateTensor, check_complete, \
    group_hyperparameters
from ..outputs import staged_dir, write_small
from .torch_files import LazyTensor, data_nbytes, load_lazy, placeholder, save_small, save_streamed

__all__ = ["read_universal", "write_universal"]

PathLike = Union[str, os.PathLike]
_STATE_FILES = MOMENT_KEYS + ("step",)


def read_universal(path: PathLike, tag: Optional[str] = None) -> NamedState:
    """Read a universal checkpoint folder lazily (see [Note: universal checkpoint layout]).

    Raises:
        CheckpointError: a missing ``zero/`` folder or ``optimizer_state.pt``, a param folder
            without its moments or step, or params whose group cannot be told.
    """
    folder = checkpoint_folder(path, tag, latest="latest_universal")
    zero = folder / "zero"
    common = zero / "optimizer_state.pt"
    if not common.is_file():
        raise CheckpointError(f"{common} is missing: not a DeepSpeed universal checkpoint")
    saved_groups = load_lazy(common).get("param_groups") or [{}]
    params: dict[str, ParamState] = {}
    weights: dict[str, StateTensor] = {}
    for param_dir in sorted(p for p in zero.rglob("*") if p.is_dir()):
        name = param_dir.relative_to(zero).as_posix()
        present = {f for f in _STATE_FILES if (param_dir / f"{f}.pt").is_file()}
        if (param_dir / "fp32.pt").is_file():
            weights[name] = _tensor(param_dir / "fp32.pt")
        if not present:
            continue
        tensors = {k: _tensor(param_dir / f"{k}.pt") for k in present if k in MOMENT_KEYS}
        shape = next((_shape(param_dir / f"{k}.pt") for k in tensors), torch.Size([-1]))
        step = step_value(load_lazy(param_dir / "step.pt"), str(param_dir / "step.pt")) if "step" in present else None
        params[name] = ParamState(name, shape, step, tensors, str(param_dir))
    groups = _groups(folder, saved_groups, list(params))
    params = {n: params[n] for g in groups for n in g["params"]}  # the model's order, not the folders'
    state = NamedState(params, groups, str(folder), {n: w for n, w in weights.items() if n in params},
                       {"global_steps": _global_steps(folder)})
    check_complete(state)
    return state


def _tensor(file: Path) -> StateTensor:
    value = load_lazy(file)
    value = value.get("param") if isinstance(value, dict) else value
    if not isinstance(value, LazyTensor):
        raise CheckpointError(f"{file} holds no tensor under 'param'")
    return StateTensor.whole(value, str(file))


def _shape(file: Path) -> torch.Size:
    return load_lazy(file)["param"].shape


def _global_steps(folder: Path) -> int:
    model_file = folder / "mp_rank_00_model_states.pt"
    return int(load_lazy(model_file).get("global_steps") or 0) if model_file.is_file() else 0


def _groups(folder: Path, saved: list, names: list[str]) -> list[dict[str, Any]]:
    """Group membership and order from the model file's ``param_shapes``; without it, one group only."""
    model_file = folder / "mp_rank_00_model_states.pt"
    shapes = load_lazy(model_file).get("param_shapes") if model_file.is_file() else None
    if shapes and len(shapes) == len(saved) and {n for s in shapes for n in s} >= set(names):
        return [{**group_hyperparameters(g), "params": [n for n in s if n in set(names)]}
                for g, s in zip(saved, shapes)]
    if len(saved) == 1:
        return [{**group_hyperparameters(saved[0]), "params": names}]
    raise CheckpointError(f"{folder}: {len(saved)} param groups, and no param_shapes in {model_file} to tell "
                          "which param belongs to which")


def write_universal(state: NamedState, dst: PathLike, *, module: Mapping[str, Any], tag: Optional[str] = None,
                    buffer_names: Sequence[str] = (), progress: Callable[[int], None] = lambda n: None) -> Path:
    """Write a universal checkpoint DeepSpeed loads at any world size with ``"load_universal": true``.

    Args:
        state: what a reader returned (validated here).
        dst: the root: ``<dst>/latest_universal`` and ``<dst>/<tag>/`` are written.
        module: the model's state dict (params and buffers); params' fp32 values come from
            ``state.weights`` where it has them.
        tag: the tag folder (default ``global_step<step>_universal``).

    Raises:
        CheckpointError: incomplete state, or no weights for a param.
    """
    check_complete(state)
    missing = [n for n in state.params if n not in module and n not in state.weights]
    if missing:
        raise CheckpointError(f"no fp32 weights for params {missing[:5]}: pass the model's state dict")
    meta = model_states(state, {}, world_size=1, stage=2, buffer_names=buffer_names)
    tag = tag or f"global_step{meta['global_steps']}_universal"
    fillers: dict[int, Callable] = {}
    meta["module"] = {k: placeholder(v.shape, v.read, fillers, v.dtype) if isinstance(v, LazyTensor) else v
                      for k, v in module.items()}
    needed = data_nbytes(meta) + state.numel * 4 * 3  # a lower bound: exp_avg, exp_avg_sq, fp32 of every param
    with staged_dir(Path(dst) / tag, needed=needed) as folder:  # the tag folder appears complete or not at all
        zero = folder / "zero"
        zero.mkdir()
        save_streamed(meta, folder / "mp_rank_00_model_states.pt", fillers)
        for name, param in state.params.items():
            _write_param(zero / name, param, state.weights.get(name) or StateTensor.whole(_to_reader(module[name]),
                                                                                           "module"))
            progress(param.shape.numel())
        for name, value in module.items():  # buffers and frozen params: weights only, as ds_to_universal does
            if name not in state.params and isinstance(value, (torch.Tensor, LazyTensor)):
                (zero / name).mkdir(parents=True, exist_ok=True)
                weights = _to_reader(value).load().float() if isinstance(value, LazyTensor) else value.float()
                save_small({"param": weights}, zero / name / "fp32.pt")
        common = {"param_groups": [{**{k: v for k, v in g.items() if k != "params"}, "params": [i]}
                                   for i, g in enumerate(state.groups)],
                  "zero_stage": 2, "partition_count": 1, "ds_version": DS_VERSION_WRITTEN}
        save_small(common, zero / "optimizer_state.pt")
    write_small(Path(dst) / "latest_universal", tag.encode())
    return Path(dst) / tag


def _write_param(param_dir: Path, param: ParamState, fp32: StateTensor) -> None:
    """One param's folder: its moments and fp32 weights, each one whole tensor, and its step."""
    param_dir.mkdir(parents=True, exist_ok=True)
    for key, source in {**param.tensors, "fp32": fp32}.items():
        fill: dict[int, Callable] = {}
        value = placeholder(param.shape, source.read, fill)
        save_streamed({"param": value, "cat_dim": 0}, param_dir / f"{key}.pt", fill)
    save_small(torch.tensor(float(param.step)), param_dir / "step.pt")


def _to_reader(value: Any) -> Any:
    return value if isinstance(value, (torch.Tensor, LazyTensor)) else torch.as_tensor(value)

"""Read DeepSpeed engine checkpoints (ZeRO stage 0, 1, 2) into a ``NamedState``, without DeepSpeed running.

[Note: DeepSpeed checkpoint layout]
Read from DeepSpeed 0.19.8 (``runtime/engine.py`` ``_save_checkpoint``/``_save_zero_checkpoint``,
``runtime/zero/stage_1_and_2.py`` ``state_dict``/``_load_legacy_checkpoint``)::

    <dir>/latest                                  the tag, e.g. "global_step8"
    <dir>/<tag>/mp_rank_00_model_states.pt        module, buffer_names, global_steps, dp_world_size, ...;
        stage 0: "optimizer" is the torch optimizer's own state dict (indices in group order)
        stage 1/2: "param_shapes" is one {FQN: shape} per group, in flat-buffer order
    <dir>/<tag>/[bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt   (stage 1/2, one per dp rank)
        ["optimizer_state_dict"]: base_optimizer_state (torch state dict over one flat partition
        per group, padded; or per-group lists when elastic), single_partition_of_fp32_groups
        (fp32 masters without the padding), partition_count, zero_stage, ds_version, ...

At stage 1/2 a group's params are concatenated in ``param_shapes`` order (plus any
``param_alignment_paddings``), padded to a multiple of 2 x the dp world size and cut into
equal partitions. DeepSpeed refuses a partition file of another world size, so exports are
written for the target world size (``deepspeed_write.py``); the universal format
(``universal.py``) has no world size.
"""
from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from .state import (MOMENT_KEYS, SHAPE_KEY, CheckpointError, NamedState, ParamState, Piece, StateTensor, check_complete,
                    group_hyperparameters)
from .torch_files import LazyTensor, load_lazy

__all__ = ["read_deepspeed", "checkpoint_folder", "step_value"]

PathLike = Union[str, os.PathLike]
_OPTIM_FILE = re.compile(r"(bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


def checkpoint_folder(path: PathLike, tag: Optional[str] = None, latest: str = "latest") -> Path:
    """The tag folder of a DeepSpeed checkpoint given its root (with a ``latest`` file) or the folder itself."""
    path = Path(path)
    if tag is not None:
        return path / tag
    if (path / latest).is_file():
        return path / (path / latest).read_text().strip()
    return path


def step_value(value: Any, where: str) -> int:
    """A saved Adam step (tensor, LazyTensor, int or float) as an int."""
    if isinstance(value, LazyTensor):
        value = value.load()
    if isinstance(value, torch.Tensor):
        value = value.item()
    if not isinstance(value, (int, float)) or value != int(value) or value < 0:
        raise CheckpointError(f"{where}: step {value!r} is not a non-negative whole number")
    return int(value)


def _stage0(folder: Path, model_file: Path, model: dict, names: Optional[Sequence[str]]) -> NamedState:
    optimizer = model.get("optimizer")
    if not isinstance(optimizer, dict) or "state" not in optimizer or "param_groups" not in optimizer:
        raise CheckpointError(f"{model_file} has no optimizer state: no *_optim_states.pt files in {folder} "
                              "and no torch optimizer state dict under 'optimizer'")
    ids = [i for g in optimizer["param_groups"] for i in g["params"]]
    if names is None:
        buffers = set(model.get("buffer_names") or ())
        names = [k for k in model["module"] if k not in buffers]
        if len(names) != len(ids):
            raise CheckpointError(f"{model_file}: the optimizer has {len(ids)} params, the module {len(names)}; "
                                  "pass the params' names in the optimizer's order")
    name_of = dict(zip(ids, names))
    params: dict[str, ParamState] = {}
    for i, entry in optimizer["state"].items():
        if i not in name_of:
            raise CheckpointError(f"{model_file}: optimizer state for param {i}, which is in no param group")
        tensors = {k: StateTensor.whole(v, str(model_file)) for k, v in entry.items()
                   if k in MOMENT_KEYS and isinstance(v, LazyTensor)}
        shape = entry[SHAPE_KEY].shape if isinstance(entry.get(SHAPE_KEY), LazyTensor) else torch.Size([-1])
        step = step_value(entry["step"], f"{model_file} param {name_of[i]!r}") if "step" in entry else None
        params[name_of[i]] = ParamState(name_of[i], shape, step, tensors, str(model_file))
    groups = [{**group_hyperparameters(g), "params": [name_of[i] for i in g["params"]]}
              for g in optimizer["param_groups"]]
    for group in groups:  # a param that never stepped has no entry, as in torch: say so, by name
        for name in group["params"]:
            if name not in params:
                raise CheckpointError(f"{model_file}: param {name!r} has no optimizer state (never stepped?)")
    return NamedState(params, groups, str(folder), extra={"global_steps": model.get("global_steps", 0)})


def _partition_pieces(offset: int, numel: int, size: int, parts: Sequence[Any]) -> tuple[Piece, ...]:
    first, last = offset // size, (offset + numel - 1) // size
    return tuple(Piece(max(offset, r * size) - offset, min(offset + numel, (r + 1) * size) - offset, parts[r],
                       max(offset, r * size) - r * size) for r in range(first, last + 1) if numel > 0)


def _group_step(state: dict, hyper: dict, osd: dict, where: str) -> Optional[int]:
    """A partition's step: in the state (torch Adam), the group (DeepSpeed's FusedAdam) or, for
    elastic checkpoints, beside the state."""
    for holder, key in ((state, "step"), (hyper, "step"), (osd, "base_optimizer_state_step")):
        if holder.get(key) is not None:
            return step_value(holder[key], where)
    return None


def read_deepspeed(path: PathLike, tag: Optional[str] = None, names: Optional[Sequence[str]] = None) -> NamedState:
    """Read a DeepSpeed ZeRO stage 0/1/2 engine checkpoint (any world size) lazily.

    Args:
        path: the checkpoint root (with ``latest``) or a tag folder.
        tag: the tag folder to read (default: the one ``latest`` names).
        names: stage 0 only: the params' FQNs in the optimizer's order (default: the module's
            entries that are not buffers, which is right when the engine got ``model.parameters()``).

    Raises:
        CheckpointError: a missing file, a partition missing, stage 3, or a param without
            its moments or step (see ``check_complete``).
    """
    folder = checkpoint_folder(path, tag)
    model_file = folder / "mp_rank_00_model_states.pt"
    if not model_file.is_file():
        raise CheckpointError(f"{model_file} is missing: not a DeepSpeed checkpoint folder")
    model = load_lazy(model_file)
    files = sorted(((int(m.group(2)), Path(f)) for f in glob.glob(str(folder / "*zero_pp_rank_*_optim_states.pt"))
                    if (m := _OPTIM_FILE.search(f))), key=lambda x: x[0])
    if not files:
        state = _stage0(folder, model_file, model, names)
        check_complete(state)
        return state
    count = model.get("dp_world_size", len(files))
    if [r for r, _ in files] != list(range(count)):
        raise CheckpointError(f"{folder}: expected optimizer partitions 0..{count - 1}, found {[r for r, _ in files]}")
    osds = [load_lazy(f)["optimizer_state_dict"] for _, f in files]
    if int(osds[0].get("zero_stage", 2)) > 2:
        raise CheckpointError(f"{files[0][1]}: ZeRO stage {int(osds[0]['zero_stage'])} is not supported (stage 0-2)")
    shapes = model.get("param_shapes")
    if not shapes:
        raise CheckpointError(f"{model_file} has no param_shapes (needed to cut stage 1/2 partitions)")
    params, groups, weights = {}, [], {}
    for g, group_shapes in enumerate(shapes):
        base = [osd["base_optimizer_state"] for osd in osds]
        states = [b["state"][g] if isinstance(b, dict) else b[g] for b in base]
        size = max(s[SHAPE_KEY].numel() for s in states) if SHAPE_KEY in states[0] else 0
        paddings = osds[0].get("param_alignment_paddings", [[0] * len(group_shapes)] * len(shapes))[g]
        if isinstance(base[0], dict):
            hyper = base[0]["param_groups"][g]
        else:  # elastic: lean partitions of unequal size; cut by the running sums instead
            hyper = {**osds[0].get("param_groups", [{}])[g]} if "param_groups" in osds[0] else {}
        found = {_group_step(s, hyper, osd, f"{f} group {g}") for s, osd, (_, f) in zip(states, osds, files)}
        if len(found) != 1:
            raise CheckpointError(f"{folder}: the partitions of param group {g} disagree on the step: {found}")
        step = found.pop()
        keys = [k for k in MOMENT_KEYS if any(k in s for s in states)]
        for key in keys:
            lacking = [str(f) for s, (_, f) in zip(states, files) if key not in s]
            if lacking:
                raise CheckpointError(f"{lacking[0]}: param group {g} has no {key!r} (other partitions have it)")
        fp32 = [osd["single_partition_of_fp32_groups"][g] for osd in osds]
        offset, names_g = 0, []
        for (name, shape), pad in zip(group_shapes.items(), paddings):
            shape = torch.Size(shape)
            spans = range(offset // size, (offset + max(shape.numel(), 1) - 1) // size + 1) if size else range(0)
            where = ", ".join(str(files[r][1]) for r in spans if r < len(files)) or str(folder)
            tensors = {k: StateTensor(shape.numel(), torch.float32,
                                      _partition_pieces(offset, shape.numel(), size, [s[k] for s in states]), where)
                       for k in keys}
            params[name] = ParamState(name, shape, step, tensors, where)
            weights[name] = StateTensor(shape.numel(), torch.float32,
                                        _partition_pieces(offset, shape.numel(), size, fp32), where)
            offset += shape.numel() + pad
            names_g.append(name)
        groups.append({**group_hyperparameters(hyper), "params": names_g})
    low = any(getattr(v, "dtype", None) in (torch.float16, torch.bfloat16) for v in (model.get("module") or {}).values())
    state = NamedState(params, groups, str(folder), weights, {"global_steps": model.get("global_steps", 0),
                                                              "zero_stage": int(osds[0].get("zero_stage", 2)),
                                                              "masters": low})
    check_complete(state)
    return state

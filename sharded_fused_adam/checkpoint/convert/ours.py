"""Our two formats (sharded checkpoint folders, gathered torch-layout files) to and from a ``NamedState``.

Param names: our checkpoints index params; a group's ``param_names`` (an optimizer built
from ``model.named_parameters()``) or an explicit list names them, else the index itself
(``"0"``, ``"1"``, ...) does. Writers record ``param_names`` so the names survive.
The sharded writer produces the layout of [Note: sharded checkpoint format] for one rank
holding whole params, which ``load_sharded`` reshards to any world size.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch

from ...kernels.rule import ADAM
from ..gathered import FORMAT_VERSION
from ..files import check_version, committed_versions, crc32_of, version_name
from ..outputs import staged_dir, write_small
from ..reader import CheckpointReader
from ..writer import RankFile, write_common, write_metadata
from .deepspeed import step_value
from .state import MASTER_KEY, MOMENT_KEYS, SHAPE_KEY, CheckpointError, NamedState, ParamState, Piece, StateTensor, check_complete, \
    group_hyperparameters
from .torch_files import LazyTensor, load_lazy, placeholder, save_streamed

__all__ = ["read_ours", "read_torch", "write_ours", "write_torch"]

PathLike = Union[str, os.PathLike]
_IMPLEMENTATION = {"maximize": False, "foreach": None, "capturable": False, "differentiable": False, "fused": None}


class _Zeros:
    def read(self, start: int, end: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        return torch.zeros(end - start) if out is None else out.zero_()


class _ReaderRange:
    def __init__(self, reader: CheckpointReader, index: int, key: str):
        self.reader, self.index, self.key = reader, index, key

    def read(self, start: int, end: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = torch.empty(end - start) if out is None else out
        self.reader.read(self.index, self.key, start, end, out)
        return out


def _names(groups: list[dict], names: Optional[Sequence[str]], where: str) -> list[str]:
    count = sum(len(g["params"]) for g in groups)
    if names is not None:
        if len(names) != count:
            raise CheckpointError(f"{where} has {count} params, got {len(names)} names")
        return list(names)
    out = [n for g in groups for n in g.get("param_names", [None] * len(g["params"]))]
    return [str(i) if n is None else n for i, n in enumerate(out)]


def _named_groups(groups: list[dict], names: list[str]) -> list[dict[str, Any]]:
    out, start = [], 0
    for g in groups:
        out.append({**group_hyperparameters(g), "params": names[start:start + len(g["params"])]})
        start += len(g["params"])
    return out


def read_ours(path: PathLike, names: Optional[Sequence[str]] = None) -> NamedState:
    """Read the latest version of a ``save_sharded`` folder lazily (params that never stepped
    read as step 0 with zero moments, which is what the format records for them)."""
    reader = CheckpointReader(path)
    groups = reader.common["param_groups"]
    fqns = _names(groups, names, str(reader.folder))
    named = _named_groups(groups, fqns)
    amsgrad = {n: bool(g.get("amsgrad")) for g in named for n in g["params"]}
    params, weights = {}, {}
    for p in reader.meta["params"]:
        i, name, shape = p["index"], fqns[p["index"]], torch.Size(p["shape"])
        keys = [k for k in MOMENT_KEYS if reader.has(i, k)]
        if p["step"] == 0 and not keys:
            keys = list(ADAM.keys_for({"amsgrad": amsgrad[name]}))
            tensors = {k: StateTensor(shape.numel(), torch.float32, (Piece(0, shape.numel(), _Zeros()),), "")
                       for k in keys}
        else:
            tensors = {k: StateTensor(shape.numel(), torch.float32, (Piece(0, shape.numel(), _ReaderRange(reader, i, k)),),
                                      str(reader.folder)) for k in keys}
        params[name] = ParamState(name, shape, int(p["step"]), tensors, str(reader.folder))
        if reader.has(i, MASTER_KEY):
            weights[name] = StateTensor(shape.numel(), torch.float32,
                                        (Piece(0, shape.numel(), _ReaderRange(reader, i, MASTER_KEY)),),
                                        str(reader.folder))
    state = NamedState(params, named, str(reader.folder), weights,
                       {"loss_scaler": reader.common.get("loss_scaler"), "masters": bool(weights)})
    check_complete(state)
    return state


def read_torch(path: PathLike, names: Optional[Sequence[str]] = None) -> NamedState:
    """Read a torch.optim.Adam-layout state dict file (``save_full``, ``torch.save(opt.state_dict())``) lazily."""
    sd = load_lazy(path)
    if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
        raise CheckpointError(f"{path} is not an optimizer state dict (no 'state'/'param_groups')")
    check_version(path, sd.get("sharded_fused_adam"), FORMAT_VERSION)
    ids = [i for g in sd["param_groups"] for i in g["params"]]
    fqns = _names(sd["param_groups"], names, str(path))
    name_of = dict(zip(ids, fqns))
    params, weights = {}, {}
    for i, entry in sd["state"].items():
        if i not in name_of:
            raise CheckpointError(f"{path}: state for param {i!r}, which is in no param group")
        name = name_of[i]
        tensors = {k: StateTensor.whole(v, str(path)) for k, v in entry.items()
                   if k in MOMENT_KEYS and isinstance(v, LazyTensor)}
        shape = entry[SHAPE_KEY].shape if isinstance(entry.get(SHAPE_KEY), LazyTensor) else torch.Size([-1])
        step = step_value(entry["step"], f"{path} param {name!r}") if "step" in entry else None
        params[name] = ParamState(name, shape, step, tensors, str(path))
        if isinstance(entry.get(MASTER_KEY), LazyTensor):
            weights[name] = StateTensor.whole(entry[MASTER_KEY], str(path))
    state = NamedState(params, _named_groups(sd["param_groups"], fqns), str(path), weights,
                       {"loss_scaler": sd.get("sharded_fused_adam", {}).get("loss_scaler"), "masters": bool(weights)})
    for name in fqns:
        if name not in params:
            raise CheckpointError(f"{path}: param {name!r} has no optimizer state (never stepped?)")
    check_complete(state)
    return state


def _torch_groups(state: NamedState) -> list[dict[str, Any]]:
    groups, start = [], 0
    for g in state.groups:
        n = len(g["params"])
        groups.append({**_IMPLEMENTATION, **{k: v for k, v in g.items() if k != "params"},
                       "params": list(range(start, start + n)), "param_names": list(g["params"])})
        start += n
    return groups


class _Checksummed:
    """A filler that keeps the CRC-32 of what it returned (in order, as float32: what ``save_streamed`` writes),
    and the filler of a one-element int64 placeholder that holds that CRC, written after the data."""

    def __init__(self, read: Callable[[int, int], torch.Tensor]):
        self.source, self.crc = read, 0

    def read(self, start: int, end: int) -> torch.Tensor:
        piece = self.source(start, end).to(torch.float32).contiguous()
        self.crc = crc32_of(piece, self.crc)
        return piece

    def value(self, start: int, end: int) -> torch.Tensor:
        return torch.tensor([self.crc], dtype=torch.int64)


def write_torch(state: NamedState, path: PathLike, progress: Callable[[int], None] = lambda n: None) -> None:
    """Write a torch.optim.Adam-layout state dict file, streamed (``load_full`` and torch read it).

    Like ``save_full``, it records the CRC-32 of every state tensor under
    ``sharded_fused_adam.crc32``, which ``load_full`` verifies; the CRCs are computed while
    the data is written and stored in int64 placeholders written after it.
    """
    check_complete(state)
    order = [n for g in state.groups for n in g["params"]]
    fillers: dict[int, Callable] = {}
    out: dict[int, dict] = {}
    crcs: dict[int, dict[str, Any]] = {}
    for i, name in enumerate(order):
        p = state.params[name]
        entry: dict[str, Any] = {"step": torch.tensor(float(p.step))}
        crcs[i] = {"step": crc32_of(entry["step"])}
        sources = {key: tensor.read for key, tensor in p.tensors.items()}
        if state.extra.get("masters") and name in state.weights:
            sources[MASTER_KEY] = state.weights[name].read
        for key, read in sources.items():
            checksummed = _Checksummed(read)
            entry[key] = placeholder(p.shape, checksummed.read, fillers)
            crcs[i][key] = placeholder((), checksummed.value, fillers, torch.int64)
        out[i] = entry
    extra = {"version": FORMAT_VERSION, "world_size": 1,
             "loss_scaler": state.extra.get("loss_scaler") or {"scale": 1.0}, "crc32": crcs}
    # "state" before "sharded_fused_adam": save_streamed fills in this order, so every CRC is final when written
    save_streamed({"state": out, "param_groups": _torch_groups(state), "sharded_fused_adam": extra}, path, fillers)
    progress(state.numel)


def _write_version(state: NamedState, folder: Path, progress: Callable[[int], None]) -> None:
    """The files of one version (see [Note: sharded checkpoint format]) into ``folder``: one rank
    file holding whole params, in chunks of at most 16M elements, through the format's one writer."""
    order = [n for g in state.groups for n in g["params"]]
    with RankFile(folder, 0, 1) as rank_file:
        for i, name in enumerate(order):
            p = state.params[name]
            sources = dict(p.tensors)
            if state.extra.get("masters") and name in state.weights:
                sources[MASTER_KEY] = state.weights[name]
            numel = p.shape.numel()
            for key, tensor in sources.items():
                for start in range(0, numel, 1 << 24):
                    end = min(numel, start + (1 << 24))
                    rank_file.add(key, tensor.read(start, end, torch.empty(end - start)), [(i, start, end, 0)])
            progress(numel)
        rank_file.close({i: state.params[n].step for i, n in enumerate(order)})
    common = write_common(folder, _torch_groups(state), state.extra.get("loss_scaler") or {"scale": 1.0})
    params = [{"index": i, "shape": list(state.params[n].shape), "step": state.params[n].step}
              for i, n in enumerate(order)]
    write_metadata(folder, 1, params, common)


def write_ours(state: NamedState, dst: PathLike, progress: Callable[[int], None] = lambda n: None) -> Path:
    """Write a sharded checkpoint folder (one rank file with whole params), param by param.

    The folder is the same format ``save_sharded`` writes at world size 1 (checksummed
    chunks of at most 16M elements, rank index, metadata), committed by one rename.
    """
    check_complete(state)
    dst = Path(dst)
    if committed_versions(dst) if dst.exists() else False:
        raise FileExistsError(f"{dst} already holds a sharded checkpoint; convert into a new folder")
    final = dst / version_name(1)
    with staged_dir(final, needed=state.numel * 4 * 2) as folder:  # a lower bound: exp_avg and exp_avg_sq
        _write_version(state, folder, progress)
    write_small(dst / "LATEST", final.name.encode())
    return final

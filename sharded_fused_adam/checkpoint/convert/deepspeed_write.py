"""Write DeepSpeed engine checkpoints (ZeRO stage 0, 1, 2) from a ``NamedState``, streamed, for any world size.

The layout is the one [Note: DeepSpeed checkpoint layout] in ``deepspeed.py`` describes; each
partition file is a ``torch.save`` file whose flat partitions are filled piece by piece from
the source (see [Note: streamed torch files]). DeepSpeed is imported only for the optional
``param_slice_mappings`` that its ``ds_to_universal`` reads.
"""
from __future__ import annotations

import bisect
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

from .state import MOMENT_KEYS, CheckpointError, NamedState, StateTensor, check_complete
from ..outputs import staged_dir, write_small
from .torch_files import LazyTensor, data_nbytes, placeholder, save_streamed

__all__ = ["write_deepspeed", "model_states", "DS_VERSION_WRITTEN"]

PathLike = Union[str, os.PathLike]
DS_VERSION_WRITTEN = "0.19.8"  # the DeepSpeed version whose layout we write


def model_states(state: NamedState, module: Mapping[str, Any], *, world_size: int, stage: int,
                 buffer_names: Sequence[str] = ()) -> dict[str, Any]:
    """The ``mp_rank_00_model_states.pt`` dict ``load_checkpoint`` reads ([Note: DeepSpeed checkpoint layout])."""
    steps = {p.step for p in state.params.values()}
    global_steps = int(state.extra.get("global_steps") or max(steps, default=0))
    return {
        "module": dict(module), "buffer_names": list(buffer_names), "optimizer": None,
        "param_shapes": [OrderedDict((n, state.params[n].shape) for n in g["params"]) for g in state.groups]
        if stage > 0 else None,
        "frozen_param_shapes": None, "shared_params": {}, "frozen_param_fragments": None, "lr_scheduler": None,
        "data_sampler": None, "random_ltd": None, "sparse_tensor_module_names": set(), "skipped_steps": 0,
        "global_steps": global_steps, "global_samples": 0, "dp_world_size": world_size, "mp_world_size": 1,
        "universal_checkpoint_info": {}, "ds_config": {}, "ds_version": DS_VERSION_WRITTEN,
    }


def _flat_reader(state: NamedState, names: list[str], tensors: Callable[[str], Optional[StateTensor]],
                 base: int, total: int) -> Callable[[int, int], torch.Tensor]:
    """``fill(start, end)`` of one partition: elements ``base + [start, end)`` of a group's flat buffer."""
    offsets = [0]
    for n in names:
        offsets.append(offsets[-1] + state.params[n].shape.numel())

    def fill(start: int, end: int) -> torch.Tensor:
        out = torch.zeros(end - start, dtype=torch.float32)
        lo, hi = base + start, min(base + end, total)
        i = bisect.bisect_right(offsets, lo) - 1
        while lo < hi and i < len(names):
            a, b = max(lo, offsets[i]), min(hi, offsets[i + 1])
            source = tensors(names[i])
            if a < b and source is not None:
                source.read(a - offsets[i], b - offsets[i], out.narrow(0, a - base - start, b - a))
            lo, i = b, i + 1
        return out
    return fill


def write_deepspeed(state: NamedState, dst: PathLike, *, world_size: int, stage: int = 2,
                    module: Mapping[str, Any], buffer_names: Sequence[str] = (), tag: Optional[str] = None,
                    progress: Callable[[int], None] = lambda n: None) -> Path:
    """Write an engine checkpoint that DeepSpeed's own optimizer resumes from at ``world_size`` ranks.

    Args:
        state: what a reader returned (validated here).
        dst: the checkpoint root; ``<dst>/latest`` and ``<dst>/<tag>/`` are written.
        world_size: the data-parallel size of the job that will load it.
        stage: ZeRO stage 1 or 2 (the same files), or 0 (the optimizer state in the model file).
        module: the model's state dict (params and buffers) for DeepSpeed's ``module`` entry;
            its fp32 values are the masters unless ``state.weights`` has them (fp16/bf16 models).
        tag: the tag folder (default ``global_step<step>``).

    Raises:
        CheckpointError: incomplete state, a group whose params have different steps, a
            module entry missing for a param.
    """
    check_complete(state)
    if stage not in (0, 1, 2):
        raise ValueError(f"stage must be 0, 1 or 2, got {stage}")
    missing = [n for n in state.params if n not in module]
    if missing:
        raise CheckpointError(f"the module state dict has no weights for params {missing[:5]}")
    meta = model_states(state, module, world_size=world_size, stage=stage, buffer_names=buffer_names)
    tag = tag or f"global_step{meta['global_steps']}"
    final = Path(dst) / tag
    masters = {n: state.weights.get(n) or StateTensor.whole(_as_tensor(module[n]), "module") for n in state.params}
    fillers: dict[int, Callable] = {}
    meta["module"] = {k: placeholder(v.shape, v.read, fillers, v.dtype) if isinstance(v, LazyTensor) else v
                      for k, v in module.items()}
    if stage == 0:
        meta["optimizer"] = _torch_state_dict(state, fillers)
    # a lower bound on the bytes written, compared with the free space before anything is written
    needed = data_nbytes(meta) + (state.numel * 4 * 3 if stage > 0 else 0)  # exp_avg, exp_avg_sq, fp32 master
    with staged_dir(final, needed=needed) as folder:  # the tag folder appears complete or not at all
        save_streamed(meta, folder / "mp_rank_00_model_states.pt", fillers)
        if stage > 0:
            for rank in range(world_size):
                _write_partition(state, folder, rank, world_size, stage, masters)
                progress(1)
    write_small(Path(dst) / "latest", tag.encode())
    return final


def _as_tensor(value: Any) -> Any:
    return value if isinstance(value, (torch.Tensor, LazyTensor)) else torch.as_tensor(value)


def _torch_state_dict(state: NamedState, fillers: dict) -> dict[str, Any]:
    """torch.optim.Adam's state dict with placeholders that ``save_streamed`` fills from ``state``."""
    index = {n: i for i, n in enumerate(n for g in state.groups for n in g["params"])}
    return {"state": {index[n]: {"step": torch.tensor(float(p.step)),
                                 **{k: placeholder(p.shape, t.read, fillers) for k, t in p.tensors.items()
                                    if k in MOMENT_KEYS}}
                      for n, p in state.params.items()},
            "param_groups": [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[n] for n in g["params"]]}
                             for g in state.groups]}


def _write_partition(state: NamedState, folder: Path, rank: int, world_size: int, stage: int,
                     masters: dict[str, StateTensor]) -> None:
    fillers: dict[int, Callable] = {}
    base_state, fp32, paddings, mappings = {}, [], [], []
    for g, group in enumerate(state.groups):
        names = list(group["params"])
        steps = {state.params[n].step for n in names}
        if len(steps) > 1:
            raise CheckpointError(f"{state.source}: DeepSpeed keeps one step per param group; group {g} has "
                                  f"params at steps {sorted(steps)}")
        total = sum(state.params[n].shape.numel() for n in names)
        align = 2 * world_size
        size = -(-total // align) * align // world_size
        start = rank * size
        padding = size if total <= start else max(0, start + size - total)
        entry: dict[str, Any] = {"step": torch.tensor(float(steps.pop() if steps else 0))}
        keys = [k for k in MOMENT_KEYS if all(k in state.params[n].tensors for n in names)]
        for key in keys:
            entry[key] = placeholder(size, _flat_reader(state, names, lambda n, k=key: state.params[n].tensors[k],
                                                         start, total), fillers)
        base_state[g] = entry
        fp32.append(placeholder(size - padding, _flat_reader(state, names, masters.get, start, total), fillers))
        paddings.append(padding)
        mappings.append(_slice_mappings(state, names, start, size))
    osd = {
        "base_optimizer_state": {"state": base_state, "param_groups": [
            {**{k: v for k, v in g.items() if k != "params"}, "params": [i]} for i, g in enumerate(state.groups)]},
        "single_partition_of_fp32_groups": fp32, "zero_stage": stage, "group_paddings": paddings,
        "param_alignment_paddings": [[0] * len(g["params"]) for g in state.groups], "partition_count": world_size,
        "ds_version": DS_VERSION_WRITTEN,
    }
    if mappings[0] is not None:
        osd["param_slice_mappings"] = mappings
    save_streamed({"optimizer_state_dict": osd, "ds_config": {}, "ds_version": DS_VERSION_WRITTEN},
                  folder / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", fillers)


def _slice_mappings(state: NamedState, names: list[str], start: int, size: int) -> Optional[OrderedDict]:
    """Each param's fragment in this partition, as DeepSpeed's ``ds_to_universal`` reads it (needs DeepSpeed)."""
    try:
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return None
    out, offset = OrderedDict(), 0
    for n in names:
        numel = state.params[n].shape.numel()
        lo, hi = max(offset, start), min(offset + numel, start + size)
        if lo < hi:
            out[n] = fragment_address(numel=hi - lo, start=lo - start)
        offset += numel
    return out

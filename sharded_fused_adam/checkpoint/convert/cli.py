"""``sharded-fused-adam-checkpoint convert``: any supported format to any other, offline, streamed.

Readers are lazy (see [Note: named optimizer state]), so the conversion holds one param
range (at most 64 MiB) or one DCP param tensor at a time, not the checkpoint. The progress
bar counts state elements read (tqdm when installed, else a line on stderr every 10%).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional

from .state import NamedState, StateTensor

__all__ = ["FORMATS", "add_parser", "run", "read", "write"]

FORMATS = ("ours", "torch", "deepspeed", "universal", "dcp")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("convert", help="convert between ours, torch, deepspeed, universal and dcp checkpoints")
    p.add_argument("--from", dest="src_format", choices=FORMATS, required=True)
    p.add_argument("--to", dest="dst_format", choices=FORMATS, required=True)
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--world-size", type=int, default=1, help="deepspeed: the dp world size that will load it")
    p.add_argument("--stage", type=int, default=2, choices=(0, 1, 2), help="deepspeed: the ZeRO stage")
    p.add_argument("--module", type=Path, help="deepspeed/universal: a torch.save'd model state dict "
                                               "(default: the source's own, for deepspeed sources)")
    p.add_argument("--names", type=Path, help="ours/torch: a JSON list of param FQNs in the optimizer's order")
    p.add_argument("--tag", help="deepspeed/universal: the tag folder to read or write")
    p.add_argument("--key", default="optimizer", help="dcp: the top-level key of the optimizer state")
    p.add_argument("--no-progress", action="store_true")


def read(fmt: str, src: Path, *, names: Optional[list] = None, tag: Optional[str] = None,
         key: str = "optimizer") -> NamedState:
    """Open a checkpoint of format ``fmt`` lazily."""
    from .dcp import read_dcp
    from .deepspeed import read_deepspeed
    from .ours import read_ours, read_torch
    from .universal import read_universal

    if fmt == "ours":
        return read_ours(src, names)
    if fmt == "torch":
        return read_torch(src, names)
    if fmt == "deepspeed":
        return read_deepspeed(src, tag, names)
    if fmt == "universal":
        return read_universal(src, tag)
    return read_dcp(src, key=key)


def _module(state: NamedState, fmt: str, src: Path, module: Optional[Path], tag: Optional[str]) -> tuple[dict, list]:
    """The model state dict DeepSpeed files need, lazily: ``--module``, else the source's own."""
    from .deepspeed import checkpoint_folder
    from .torch_files import load_lazy

    if module is not None:
        return dict(load_lazy(module)), []
    if fmt in ("deepspeed", "universal"):
        folder = checkpoint_folder(src, tag, "latest" if fmt == "deepspeed" else "latest_universal")
        meta = load_lazy(folder / "mp_rank_00_model_states.pt")
        return dict(meta.get("module") or {}), list(meta.get("buffer_names") or [])
    return dict(state.weights), []


def write(state: NamedState, fmt: str, dst: Path, *, module: Optional[dict] = None, buffer_names: list = (),
          world_size: int = 1, stage: int = 2, tag: Optional[str] = None, key: str = "optimizer") -> None:
    """Write ``state`` as format ``fmt`` at ``dst``."""
    from .dcp import write_dcp
    from .deepspeed_write import write_deepspeed
    from .ours import write_ours, write_torch
    from .universal import write_universal

    if fmt == "ours":
        write_ours(state, dst)
    elif fmt == "torch":
        write_torch(state, dst)
    elif fmt == "deepspeed":
        write_deepspeed(state, dst, world_size=world_size, stage=stage, module=module or {},
                        buffer_names=buffer_names, tag=tag)
    elif fmt == "universal":
        write_universal(state, dst, module=module or {}, buffer_names=buffer_names, tag=tag)
    else:
        write_dcp(state, dst, key=key)


class _Counting:
    def __init__(self, source: Any, tick: Callable[[int], None]):
        self.source, self.tick = source, tick

    def read(self, start: int, end: int, out: Any = None) -> Any:
        value = self.source.read(start, end, out)
        self.tick(end - start)
        return value


def with_progress(state: NamedState, tick: Callable[[int], None]) -> NamedState:
    """The same state, every piece read reported to ``tick(elements)``."""
    def wrap(t: StateTensor) -> StateTensor:
        return replace(t, pieces=tuple(replace(p, source=_Counting(p.source, tick)) for p in t.pieces))
    params = {n: replace(p, tensors={k: wrap(t) for k, t in p.tensors.items()}) for n, p in state.params.items()}
    return replace(state, params=params, weights={n: wrap(t) for n, t in state.weights.items()})


def _bar(total: int, enabled: bool) -> tuple[Callable[[int], None], Callable[[], None]]:
    if not enabled:
        return (lambda n: None), (lambda: None)
    try:
        from tqdm import tqdm
    except ImportError:
        done, shown = [0], [0]

        def tick(n: int) -> None:
            done[0] += n
            if done[0] * 10 // max(total, 1) > shown[0]:
                shown[0] = done[0] * 10 // max(total, 1)
                print(f"converted {done[0] / 1e6:.0f}M of {total / 1e6:.0f}M elements", file=sys.stderr)
        return tick, (lambda: None)
    bar = tqdm(total=total, unit="el", unit_scale=True, desc="convert", file=sys.stderr)
    return bar.update, bar.close


def run(args: argparse.Namespace) -> int:
    names = json.loads(args.names.read_text()) if args.names else None
    started = time.monotonic()
    state = read(args.src_format, args.src, names=names, tag=args.tag, key=args.key)
    module, buffer_names = ({}, [])
    if args.dst_format in ("deepspeed", "universal"):
        module, buffer_names = _module(state, args.src_format, args.src, args.module, args.tag)
    total = sum(t.numel for p in state.params.values() for t in p.tensors.values())
    tick, close = _bar(total, not args.no_progress)
    try:
        write(with_progress(state, tick), args.dst_format, args.dst, module=module, buffer_names=buffer_names,
              world_size=args.world_size, stage=args.stage, tag=args.tag, key=args.key)
    finally:
        close()
    print(f"wrote {args.dst} ({args.dst_format}): {len(state.params)} params, {state.numel / 1e6:.1f}M elements, "
          f"{time.monotonic() - started:.1f} s")
    return 0


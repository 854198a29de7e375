"""``bench_step.py --breakdown``: where an iteration's time goes, for DDP, torch ZeRO and ours.

Each round runs, for each of the two configurations, an iteration whose backward is under
``no_sync()`` (no gradient communication: the pure compute cost), discards those gradients,
then a normal iteration. ``backward_sync - backward_compute`` is then the communication (and,
for ours, gradient-hook copying) that backward did not hide. Ours' ``step()`` is split by
timing three of its internal phases in place (``_grad_stats``: waiting for the reductions and
the overflow/norm all-reduce; ``_update_shards``: the fused kernel on this rank's shards;
``_gather_params``: the shard broadcast / all-gather); torch ZeRO's into ``_local_step`` (the
fused Adam on its params) and ``_sync_params`` (its broadcasts). They are private methods: if
they are renamed this mode fails loudly rather than report a wrong split.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch
import torch.distributed as dist

from configs import Trainer, build
from models import BatchSpec, GPTLike, make_batches

__all__ = ["run", "PHASES"]

# The methods whose time splits each configuration's step(); DDP's step is Adam alone.
PHASES = {"ddp_adam": (), "torch_zero": ("_local_step", "_sync_params"),
          "ours": ("_grad_stats", "_update_shards", "_gather_params")}


def _instrument(obj: object, names: tuple[str, ...], sink: dict[str, float]) -> None:
    """Replace each bound method ``names`` of ``obj`` with a wrapper adding its wall time to ``sink``."""
    for name in names:
        original: Callable[..., Any] = getattr(obj, name)  # AttributeError if renamed: fail loudly

        def timed(*a: Any, _original: Callable[..., Any] = original, _name: str = name, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return _original(*a, **k)
            finally:
                sink[_name] += time.perf_counter() - t0

        setattr(obj, name, timed)


def _compute_only(t: Trainer, tokens: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    sync_off = t.optimizer.no_sync() if t.name == "ours" else t.ddp.no_sync()
    t0 = time.perf_counter()
    with sync_off:
        loss = t.forward(tokens, targets)
        t1 = time.perf_counter()
        loss.backward()
    t2 = time.perf_counter()
    t.optimizer.zero_grad(set_to_none=True)  # drop the unsynchronized gradients
    return t1 - t0, t2 - t1


def run(args: Any, spec: BatchSpec, rounds: int, rank: int) -> dict[str, Any]:
    """Instrumented rounds of DDP, torch ZeRO and ours at ``spec``; medians in seconds."""
    data = make_batches(spec, args.model_spec.vocab, rounds + 1, rank=rank, seed=args.seed)
    trainers, sinks = [], {}
    for name in PHASES:
        torch.manual_seed(args.seed)
        trainers.append(build(name, GPTLike(args.model_spec), args.settings, micro_batch=spec.batch))
        sinks[name] = {phase: 0.0 for phase in PHASES[name]}
        _instrument(trainers[-1].optimizer, PHASES[name], sinks[name])
    samples: dict[str, dict[str, list[float]]] = {t.name: {} for t in trainers}
    for r, (tokens, targets) in enumerate(data):
        for t in trainers:
            dist.barrier()
            fwd_c, bwd_c = _compute_only(t, tokens, targets)
            dist.barrier()
            sink = sinks[t.name]
            for phase in sink:
                sink[phase] = 0.0
            times = t.train_step(tokens, targets)
            if r == 0:
                continue  # warm-up
            row = {"forward": times.forward, "backward_sync": times.backward, "step": times.step,
                   "forward_compute": fwd_c, "backward_compute": bwd_c,
                   **{f"step{phase}": sec for phase, sec in sink.items()}}
            for key, value in row.items():
                samples[t.name].setdefault(key, []).append(value)
    out: dict[str, Any] = {"batch": spec.label, "rounds": rounds, "configs": {}}
    for name, columns in samples.items():
        out["configs"][name] = {key: statistics.median(values) for key, values in columns.items()}
    del trainers
    return out

"""Plot the ZeRO per-rank memory formulas against the world size N, for the docs.

Bytes per rank per model parameter (Ψ), ignoring activations and communication buffers:

* plain data parallel, fp16/bf16 weights with fp32 masters: 2 + 2 + 12 = 16;
* ZeRO-1 (optimizer state sharded): 4 + 12/N;
* ZeRO-2 (gradients sharded too): 2 + 14/N;
* ShardedFusedAdam with an fp32 model: 4 (params) + 4/N (gradient shard) + 8/N (moments);
  the param shard is its own master, so there is no master copy;
* ShardedFusedAdam with bf16/fp16 params: 2 + 4/N (fp32 gradient shard) + 4/N (fp32 master)
  + 8/N (moments).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling modules, also when imported
from report import md_table  # noqa: E402
from runner import REPO  # noqa: E402

FORMULAS: dict[str, tuple[str, Callable[[int], float]]] = {
    "plain DP (16Ψ)": ("-", lambda n: 16.0),
    "ZeRO-1 (4Ψ + 12Ψ/N)": ("-", lambda n: 4 + 12 / n),
    "ZeRO-2 (2Ψ + 14Ψ/N)": ("-", lambda n: 2 + 14 / n),
    "ours, fp32 model (4Ψ + 4Ψ/N + 8Ψ/N)": ("--", lambda n: 4 + 4 / n + 8 / n),
    "ours, bf16 params (2Ψ + 16Ψ/N)": (":", lambda n: 2 + 16 / n),
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-world-size", type=int, default=64)
    p.add_argument("--num-params", type=float, default=0.0,
                   help="if > 0, a second axis in GiB for a model of this many params (e.g. 7e9)")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "memory_formulas.png")
    args = p.parse_args(argv)
    if args.max_world_size < 2:
        p.error(f"--max-world-size must be >= 2, got {args.max_world_size}")
    return args


def table(world_sizes: Sequence[int]) -> str:
    """The formulas' bytes per parameter at ``world_sizes``, as a markdown table."""
    return md_table(["per rank, bytes/param", *[f"N={n}" for n in world_sizes]],
                    [[name, *[f"{fn(n):.2f}" for n in world_sizes]] for name, (_, fn) in FORMULAS.items()])


def plot(max_world_size: int, out: Path, num_params: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = list(range(1, max_world_size + 1))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, (style, fn) in FORMULAS.items():
        ax.plot(ns, [fn(n) for n in ns], style, lw=2, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks([n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256) if n <= max_world_size])
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("data-parallel ranks N")
    ax.set_ylabel("bytes per parameter per rank")
    ax.set_ylim(0, 19)
    ax.grid(alpha=0.3)
    if num_params > 0:
        gib = ax.secondary_yaxis("right", functions=(lambda b: b * num_params / 2**30,
                                                      lambda g: g * 2**30 / num_params))
        gib.set_ylabel(f"GiB per rank for {num_params:.3g} params")
    ax.set_title("Model + gradient + optimizer memory per rank (activations and buffers excluded)")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    plot(args.max_world_size, args.out, args.num_params)
    print(table([n for n in (1, 2, 8, 64) if n <= args.max_world_size]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

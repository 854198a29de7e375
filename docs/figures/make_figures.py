"""Draw the concept figures of docs/concepts.md from the real layout code (run from the repo root).

    python docs/figures/make_figures.py   # writes docs/figures/layout.png and step.png
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

from sharded_fused_adam.core.layout import plan_buckets  # noqa: E402

OUT = Path(__file__).resolve().parent
COLORS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860"]


def layout_figure() -> None:
    """Four params packed into one bucket, padded, split into three equal shards."""
    numels = [70, 20, 45, 33]
    (bucket,) = plan_buckets([(i, n) for i, n in enumerate(numels)], world_size=3, bucket_numel=10**6)
    fig, ax = plt.subplots(figsize=(11, 3.6))
    rows = {"params (views)": 3.0, "flat buffer": 2.0, "rank shards": 1.0}
    for slot in bucket.slots:
        ax.add_patch(Rectangle((slot.offset, 1.7), slot.numel, 0.6, color=COLORS[slot.index]))
        ax.text(slot.offset + slot.numel / 2, 2.0, f"p{slot.index}\n{slot.numel}", ha="center", va="center",
                color="white", fontsize=9)
        ax.add_patch(Rectangle((slot.offset, 2.7), slot.numel, 0.6, color=COLORS[slot.index], alpha=0.5))
    for start, end in bucket.gaps():
        ax.add_patch(Rectangle((start, 1.7), end - start, 0.6, facecolor="white", edgecolor="grey", hatch="//"))
    for rank in range(bucket.world_size):
        lo, hi = bucket.shard_range(rank)
        ax.add_patch(Rectangle((lo, 0.7), hi - lo, 0.6, facecolor=COLORS[4 + rank % 2], alpha=0.35, edgecolor="k"))
        ax.text((lo + hi) / 2, 1.0, f"rank {rank}: grad, master, exp_avg, exp_avg_sq shards", ha="center",
                va="center", fontsize=8)
        ax.axvline(lo, color="k", lw=0.8, ls=":")
    ax.set_xlim(0, bucket.padded_numel)
    ax.set_ylim(0.5, 3.5)
    ax.set_yticks(list(rows.values()), list(rows.keys()))
    ax.set_xlabel("element offset in the bucket (params start on 16-element boundaries)")
    ax.legend(handles=[Patch(facecolor="white", edgecolor="grey", hatch="//", label="alignment / tail padding")],
              loc="upper right", fontsize=8)
    ax.set_title("One bucket at world size 3: params are views into a flat buffer; each rank owns one equal shard")
    fig.tight_layout()
    fig.savefig(OUT / "layout.png", dpi=110)


def step_figure() -> None:
    """The three phases of a step on one rank, with what each moves."""
    fig, ax = plt.subplots(figsize=(11, 2.8))
    phases = [
        ("backward", 0, 5.0, "#999999", "grads copied into bucket buffers\nby hooks, p.grad freed"),
        ("reduce", 1.5, 4.0, "#4C72B0", "per bucket, async:\nreduce-scatter (NCCL/HCCL)\nall-reduce + slice (gloo)"),
        ("update", 5.6, 1.6, "#55A868", "fused Adam on own shards\n(one call per bucket)"),
        ("gather", 6.6, 2.2, "#DD8452", "per bucket: all-gather (NCCL/HCCL)\nor owner broadcasts (gloo)\ninto the params"),
    ]
    for row, (name, start, width, color, label) in enumerate(phases):
        y = 3 - row
        ax.add_patch(Rectangle((start, y - 0.35), width, 0.7, color=color, alpha=0.8))
        ax.text(start + width + 0.1, y, label, va="center", fontsize=8)
        ax.text(start + 0.1, y, name, va="center", color="white", fontsize=9, weight="bold")
    ax.set_xlim(0, 11.5)
    ax.set_ylim(-0.6, 3.6)
    ax.axis("off")
    ax.set_title("One training step on one rank: communication overlaps backward and the update")
    fig.tight_layout()
    fig.savefig(OUT / "step.png", dpi=110)


if __name__ == "__main__":
    layout_figure()
    step_figure()

"""Turns bench_step.py's per-rank JSON into one summary, a markdown report and PNG plots."""
from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Any, Sequence

from configs import LABELS

__all__ = ["summarize", "step_markdown", "plot_step", "md_table", "MiB"]

MiB = 2**20
ANCHORS = ("ddp_adam", "torch_zero", "ds_zero1", "ds_zero2")
SHORT = {"ddp_adam": "DDP", "torch_zero": "torch ZeRO", "ds_zero1": "DS ZeRO-1", "ds_zero2": "DS ZeRO-2",
         "ours": "ours"}
# (anchor, the most ours' median step time may be as a fraction of the anchor's)
STEP_TARGETS = (("ddp_adam", 0.95), ("torch_zero", 1.0), ("ds_zero2", 0.75))
HELD_TOLERANCE = 1e-3  # ours' optimizer-held bytes within 0.1% of 8Ψ/N (fp32 model)
BREAKDOWN_ROWS = {
    "forward": "zero_grad + forward",
    "backward_compute": "backward, compute only (under no_sync)",
    "backward_sync": "backward",
    "backward_exposed": "= backward communication/copies not hidden",
    "step": "step()",
    "step_local_step": "of which torch ZeRO: Adam on own params (_local_step)",
    "step_sync_params": "of which torch ZeRO: broadcast params (_sync_params)",
    "step_grad_stats": "of which ours: wait for reductions + overflow/norm (_grad_stats)",
    "step_update_shards": "of which ours: fused Adam on own shards (_update_shards)",
    "step_gather_params": "of which ours: param gathers (_gather_params; overlapped: only their start)",
    "total": "total",
}


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _config_row(name: str, per_rank: list[dict], memory: list[dict], label: str) -> dict[str, Any]:
    phases = [e["step_phases_s"] for e in per_rank]
    # A step is as slow as its slowest rank: per step, the max over ranks of the total time.
    totals = [max(sum(rank_phases[i]) for rank_phases in phases) for i in range(len(phases[0]))]
    phase_ms = [statistics.mean(statistics.median(p[i] for p in rank_phases) for rank_phases in phases) * 1e3
                for i in range(3)]
    row: dict[str, Any] = {
        "label": LABELS[name],
        "num_steps": len(totals),
        "median_ms": statistics.median(totals) * 1e3,
        "p25_ms": _quantile(totals, 0.25) * 1e3,
        "p75_ms": _quantile(totals, 0.75) * 1e3,
        "forward_ms": phase_ms[0], "backward_ms": phase_ms[1], "step_ms": phase_ms[2],
        "held_bytes_per_rank": [e["held_masters"] + e["held_state"] for e in per_rank],
        "held_masters_per_rank": [e["held_masters"] for e in per_rank],
    }
    diffs = [e["max_abs_diff_vs_ddp"] for e in per_rank if "max_abs_diff_vs_ddp" in e]
    if diffs:
        row["max_abs_diff_vs_ddp"] = max(diffs)
    for key in ("memory_report", "last_step_comm_bytes"):
        if key in per_rank[0]:
            row[key] = [e[key] for e in per_rank]
    mem = sorted((m for m in memory if m["config"] == name and m["batch"] == label), key=lambda m: m["rank"])
    if mem:
        row["peak_rss_per_rank"] = [m["peak_rss"] for m in mem]
        row["baseline_rss_per_rank"] = [m["baseline_rss"] for m in mem]
    return row


def _breakdown(ranks: list[dict]) -> list[dict]:
    out = []
    for bi, first in enumerate(ranks[0]["breakdown"]):
        entry: dict[str, Any] = {"batch": first["batch"], "configs": {}}
        for name in (c for c in (*ANCHORS, "ours") if c in first["configs"]):
            per_rank = [r["breakdown"][bi]["configs"][name] for r in ranks]
            ms = {k: statistics.mean(p[k] for p in per_rank) * 1e3 for k in per_rank[0]}
            ms["backward_exposed"] = ms["backward_sync"] - ms["backward_compute"]
            ms["total"] = ms["forward"] + ms["backward_sync"] + ms["step"]
            entry["configs"][name] = ms
        out.append(entry)
    return out


def _targets(rows: dict[str, dict], psi: int, world_size: int) -> list[dict]:
    if "ours" not in rows:
        return []
    ours = rows["ours"]
    checks = []
    for anchor, limit in STEP_TARGETS:
        if anchor in rows:
            ratio = ours["median_ms"] / rows[anchor]["median_ms"]
            checks.append({"check": f"step time ours / {SHORT[anchor]}", "value": round(ratio, 3),
                           "target": f"<= {limit}", "passed": ratio <= limit})
    expected = 8 * psi / world_size
    rel = max(ours["held_bytes_per_rank"]) / expected - 1
    checks.append({"check": "ours optimizer-held bytes / (8Ψ/N) - 1", "value": f"{rel:+.4%}",
                   "target": f"within ±{HELD_TOLERANCE:.1%}", "passed": abs(rel) <= HELD_TOLERANCE})
    if "peak_rss_per_rank" in ours and "peak_rss_per_rank" in rows.get("torch_zero", {}):
        a, b = max(ours["peak_rss_per_rank"]), max(rows["torch_zero"]["peak_rss_per_rank"])
        checks.append({"check": "peak RSS ours / torch ZeRO (max over ranks)", "value": round(a / b, 3),
                       "target": "<= 1.0", "passed": a <= b})
    return checks


def summarize(timing: list[dict], memory: list[dict], *, settings: dict, tag: str, quick: bool,
              steps_per_round: int) -> dict[str, Any]:
    """Combine every rank's timing JSON and every memory job's JSON into one summary dict."""
    ranks = sorted(timing, key=lambda r: r["rank"])
    psi, world_size = ranks[0]["model_params"], ranks[0]["world_size"]
    batches = []
    for bi, first in enumerate(ranks[0]["batches"]):
        rows = {name: _config_row(name, [r["batches"][bi]["configs"][name] for r in ranks], memory, first["batch"])
                for name in first["order"]}
        for row in rows.values():
            row["ratio_to"] = {a: row["median_ms"] / rows[a]["median_ms"] for a in ANCHORS if a in rows}
        batches.append({"batch": first["batch"], "rounds": first["rounds"], "order": list(rows), "configs": rows,
                        "targets": _targets(rows, psi, world_size)})
    return {"tag": tag, "quick": quick, "world_size": world_size, "num_params": psi, "settings": settings,
            "steps_per_round": steps_per_round, "facts_start": ranks[0]["facts_start"],
            "facts_end": ranks[0]["facts_end"], "batches": batches, "breakdown": _breakdown(ranks)}


def _fmt_diff(row: dict) -> str:
    if "max_abs_diff_vs_ddp" not in row:
        return "n/a"
    d = row["max_abs_diff_vs_ddp"]
    return "bitwise" if d == 0 else (f"yes ({d:.1e})" if d <= 1e-5 else f"NO ({d:.1e})")


def _fmt_rss(row: dict) -> str:
    if "peak_rss_per_rank" not in row:
        return "not measured"
    peaks = "/".join(f"{p / MiB:.0f}" for p in row["peak_rss_per_rank"])
    deltas = "/".join(f"{(p - b) / MiB:.0f}" for p, b in zip(row["peak_rss_per_rank"], row["baseline_rss_per_rank"]))
    return f"{peaks} (+{deltas})"


def step_markdown(summary: dict, plots: list[Path], md_dir: Path) -> str:
    facts0, facts1 = summary["facts_start"], summary["facts_end"]
    psi, n = summary["num_params"], summary["world_size"]
    out = [f"# Step benchmark `{summary['tag']}`\n\n"]
    if summary["quick"]:
        out.append("**Quick run (tiny model): these numbers mean nothing.**\n\n")
    out.append(f"Model: {psi:,} fp32 params (Ψ), {n} gloo ranks on CPU, one intra-op thread per rank. "
               f"torch {facts0['torch']}, deepspeed {facts0['deepspeed']}, {facts0['cpu_count']} CPUs; "
               f"load average {facts0['loadavg'][0]:.2f} at the start, {facts1['loadavg'][0]:.2f} at the end. "
               f"Settings: {summary['settings']}.\n\n")
    anchors = [a for a in ANCHORS if a in summary["batches"][0]["configs"]] if summary["batches"] else []
    header = ["configuration", "median ms (p25-p75)", *[f"x {SHORT[a]}" for a in anchors], "fwd ms", "bwd ms",
              "step ms", "optimizer-held MiB/rank", "peak RSS MiB/rank (+ over baseline)", "params vs DDP"]
    for batch in summary["batches"]:
        rows = []
        for row in batch["configs"].values():
            rows.append([row["label"], f"{row['median_ms']:.1f} ({row['p25_ms']:.1f}-{row['p75_ms']:.1f})",
                         *[f"{row['ratio_to'][a]:.3f}" for a in anchors],
                         f"{row['forward_ms']:.1f}", f"{row['backward_ms']:.1f}", f"{row['step_ms']:.1f}",
                         "/".join(f"{b / MiB:.1f}" for b in row["held_bytes_per_rank"]), _fmt_rss(row),
                         _fmt_diff(row)])
        num_steps = next(iter(batch["configs"].values()))["num_steps"]
        out.append(f"## Batch {batch['batch']} per rank ({num_steps} timed steps per configuration)\n\n")
        out.append(md_table(header, rows))
        if batch["targets"]:
            out.append("\nTargets (ratios from this one run):\n\n")
            out.append(md_table(["check", "value", "target", "met"],
                                [[t["check"], t["value"], t["target"], "yes" if t["passed"] else "NO"]
                                 for t in batch["targets"]]))
        out.append("\n")
    for entry in summary["breakdown"]:
        out.append(f"## Breakdown at {entry['batch']} (medians, ms; mean of the ranks)\n\n")
        keys = [k for k in BREAKDOWN_ROWS if any(k in cols for cols in entry["configs"].values())]
        out.append(md_table(["phase", *[SHORT.get(c, c) for c in entry["configs"]]],
                            [[BREAKDOWN_ROWS[k], *[f"{cols[k]:.1f}" if k in cols else ""
                                                   for cols in entry["configs"].values()]] for k in keys]))
        out.append("\n")
    out.append(f"""## How this was measured

- All configurations live in the same two processes and are timed interleaved (A B C D E A B C D E ...,
  {summary['steps_per_round']} step(s) each, a barrier before each), after untimed warm-up rounds; every
  configuration trains from the same initial params on the same batches.
- Step time: per step the slowest rank's wall time (zero_grad + forward + backward + step), then the
  median over steps. fwd/bwd/step: per-rank medians of each phase, averaged over ranks; "step" is the
  wall time of `optimizer.step()` / `engine.step()`, whatever that call does (ours finishes its gradient
  reductions there; DDP and DeepSpeed finish theirs inside backward).
- Optimizer-held bytes: ours `memory_report().optimizer_state` (fp32 model: moments only; the param
  shard is the master); torch optimizers: every tensor in `optimizer.state`; DeepSpeed: its inner
  optimizer's state plus its fp32 partitions (`single_partition_of_fp32_groups`). Ψ = {psi:,},
  so 8Ψ/N = {8 * psi / n / MiB:.2f} MiB.
- Peak RSS: a separate short torchrun job per configuration and batch (ru_maxrss is per process);
  "+" is peak minus the RSS just before the model was built (after imports, including deepspeed's
  for its configurations, and process-group set-up).
- Params vs DDP: max |p - p_DDP| over all params after the last step ("bitwise" = 0).
""")
    for plot in plots:
        out.append(f"\n![{plot.stem}]({os.path.relpath(plot, md_dir)})\n")
    return "".join(out)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_step(summary: dict, plot_dir: Path, tag: str) -> list[Path]:
    """Step-time bars (stacked by phase) and memory bars; returns the PNG paths written."""
    plt = _plt()
    plot_dir.mkdir(parents=True, exist_ok=True)
    paths = [plot_dir / f"step_time_{tag}.png"]
    batches = summary["batches"]
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 3.8), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        names = list(batch["configs"])
        rows = [batch["configs"][n] for n in names]
        left = [0.0] * len(rows)
        for key, color in (("forward_ms", "#9ecae1"), ("backward_ms", "#4292c6"), ("step_ms", "#e6550d")):
            vals = [r[key] for r in rows]
            ax.barh([SHORT.get(n, n) for n in names], vals, left=left, color=color, label=key[:-3])
            left = [a + b for a, b in zip(left, vals)]
        for y, r in enumerate(rows):
            ax.plot([r["median_ms"]], [y], "k|", markersize=14)
            ax.text(r["median_ms"], y, f" {r['median_ms']:.0f}", va="center", fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, max(max(left), max(r["median_ms"] for r in rows)) * 1.12)
        ax.set_xlabel("ms per training step (bars: phase medians; |: median step)")
        ax.set_title(f"batch {batch['batch']} per rank, {summary['world_size']} ranks")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    paths.append(_plot_memory(summary, plot_dir / f"step_memory_{tag}.png", plt))
    if summary["breakdown"]:
        paths.append(_plot_breakdown(summary, plot_dir / f"step_breakdown_{tag}.png", plt))
    return paths


# (segment label, color, ms from one breakdown row); step parts a configuration lacks are 0.
_SEGMENTS = (
    ("forward", "#9ecae1", lambda c: c["forward"]),
    ("backward compute", "#4292c6", lambda c: c["backward_compute"]),
    ("backward: exposed comm + copies", "#fd8d3c", lambda c: c["backward_exposed"]),
    ("step: wait for reductions", "#e6550d", lambda c: c.get("step_grad_stats", 0.0)),
    ("step: Adam", "#31a354", lambda c: c.get("step_update_shards", c.get("step_local_step", c["step"]))),
    ("step: broadcast params", "#a63603", lambda c: c.get("step_gather_params", c.get("step_sync_params", 0.0))),
    ("step: other", "#bdbdbd", lambda c: c["step"] - sum(c.get(k, 0.0) for k in (
        "step_grad_stats", "step_update_shards", "step_gather_params", "step_local_step", "step_sync_params"))
        if any(k.startswith("step_") for k in c) else 0.0),
)


def _plot_breakdown(summary: dict, path: Path, plt: Any) -> Path:
    entries = summary["breakdown"]
    fig, axes = plt.subplots(1, len(entries), figsize=(6 * len(entries), 3.2), squeeze=False)
    for ax, entry in zip(axes[0], entries):
        names = list(entry["configs"])
        left = [0.0] * len(names)
        for label, color, value in _SEGMENTS:
            vals = [max(0.0, value(entry["configs"][n])) for n in names]
            ax.barh([SHORT.get(n, n) for n in names], vals, left=left, color=color, label=label)
            left = [a + b for a, b in zip(left, vals)]
        ax.invert_yaxis()
        ax.set_xlabel("ms (medians of each phase)")
        ax.set_title(f"where the time goes, batch {entry['batch']} per rank")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=4, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.85))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_memory(summary: dict, path: Path, plt: Any) -> Path:
    batches = summary["batches"]
    psi, n = summary["num_params"], summary["world_size"]
    names = list(batches[0]["configs"])
    measured = all("peak_rss_per_rank" in b["configs"][c] for b in batches for c in names)
    fig, axes = plt.subplots(1, 2 if measured else 1, figsize=(12 if measured else 6, 3.8), squeeze=False)
    ax0 = axes[0][0]
    held = [max(batches[0]["configs"][c]["held_bytes_per_rank"]) / MiB for c in names]
    ax0.barh([SHORT.get(c, c) for c in names], held, color="#756bb1")
    ax0.axvline(8 * psi / n / MiB, color="k", ls="--", lw=1, label="8Ψ/N (moments, sharded)")
    ax0.invert_yaxis()
    ax0.set_xlabel("optimizer-held MiB per rank (masters + moments)")
    ax0.legend(fontsize=8)
    if measured:
        ax1 = axes[0][1]
        width = 0.8 / len(batches)
        for i, batch in enumerate(batches):
            peaks = [max(batch["configs"][c]["peak_rss_per_rank"]) / MiB for c in names]
            ax1.barh([y + i * width for y in range(len(names))], peaks, height=width,
                     label=f"batch {batch['batch']}")
        ax1.set_yticks([y + width * (len(batches) - 1) / 2 for y in range(len(names))], [SHORT.get(c, c) for c in names])
        ax1.invert_yaxis()
        ax1.set_xlabel("peak RSS MiB per rank (own process per configuration)")
        ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path



"""Training quality of bf16 moments (and 2-byte masters) on the char-GPT of examples/train_gpt.py.

One process, no process group: the optimizer is the same code at any world size, and bf16
rounding of the moments does not depend on how they are sharded. Every run starts from the
same weights and sees the same batches (``train_gpt.CharData``, world size 1) for
``--steps`` steps with train_gpt's AdamW settings (lr 3e-3 with warm-up and cosine decay,
betas (0.9, 0.95), weight decay 0.1 on matrices, clipping at 1.0):

* ``fp32``: fp32 model, fp32 moments (the reference);
* ``fp32 + bf16 moments``: fp32 model, ``state_dtype=torch.bfloat16``;
* ``fp32, 1-ulp nudge``: the reference with one weight moved by one ulp at the start: the
  chaos floor, how far two runs drift apart from a perturbation that carries no information;
* ``bf16 + 2-byte master``: bf16 model, ``master_weights="split"`` (bit for bit a 4-byte
  master run, see tests/test_memory_tier.py);
* ``bf16 + 2-byte master + bf16 moments``.

Each bf16-moment run also has a *tracking* twin that is fed the gradients of its fp32-moment
counterpart (computed at the counterpart's weights), so the twin's distance from the
counterpart is the optimizer's own error, without the feedback through the model.

Run: ``.venv/bin/python benchmarks/state_quality.py [--steps 500]`` (about 10 minutes on 2 busy cores).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))
import train_gpt  # noqa: E402

from sharded_fused_adam import ShardedFusedAdamW  # noqa: E402


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "state_quality.json")
    args = p.parse_args(argv)
    # train_gpt's defaults for what its lr_lambda and param_groups read
    args.lr, args.weight_decay, args.max_grad_norm, args.context = 3e-3, 0.1, 1.0, 64
    return args


class Run:
    """One model + optimizer; ``tracker`` runs are stepped with another run's gradients."""

    def __init__(self, name: str, model: train_gpt.GPT, args: argparse.Namespace, **options):
        self.name, self.model, self.losses = name, model, []
        self.opt = ShardedFusedAdamW(train_gpt.param_groups(model, args.weight_decay), lr=args.lr,
                                     betas=train_gpt.BETAS, **options)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, train_gpt.lr_lambda(args))

    def step(self, x: torch.Tensor, y: torch.Tensor, max_grad_norm: float,
             grads: Optional[list[torch.Tensor]] = None) -> None:
        """One step on its own gradients, or (a tracker) on ``grads``."""
        self.opt.zero_grad()
        if grads is None:
            loss = self.model(x, y)
            self.losses.append(loss.item())
            loss.backward()
        else:
            for p, g in zip(self.model.parameters(), grads):
                p.grad = g.clone()
        self.opt.clip_grad_norm_(max_grad_norm)
        self.opt.step()
        self.sched.step()


def _grads_watcher(run: Run) -> list:
    """Capture each param's gradient as backward produces it (the optimizer then moves it into its shards)."""
    captured: list = [None] * len(list(run.model.parameters()))
    for i, p in enumerate(run.model.parameters()):
        p.register_hook(lambda g, i=i: captured.__setitem__(i, g.detach().clone()))
    return captured


@torch.no_grad()
def distance(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return math.sqrt(sum(float((x.float() - y.float()).pow(2).sum()) for x, y in zip(a.parameters(), b.parameters())))


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    data = train_gpt.CharData(train_gpt.DATA.read_text(encoding="utf-8"), context=args.context,
                              batch_size=args.batch_size, world_size=1, seed=args.seed)
    config = train_gpt.GPTConfig(data.vocab_size)
    torch.manual_seed(args.seed)
    start = train_gpt.GPT(config)
    nudged = copy.deepcopy(start)
    with torch.no_grad():
        w = nudged.blocks[0].mlp[0].weight
        w.view(-1)[0] = torch.nextafter(w.view(-1)[0], torch.tensor(1.0))
    bf16 = copy.deepcopy(start).to(torch.bfloat16)
    runs = {
        "fp32": Run("fp32", copy.deepcopy(start), args),
        "fp32 + bf16 moments": Run("fp32 + bf16 moments", copy.deepcopy(start), args, state_dtype=torch.bfloat16),
        "fp32, 1-ulp nudge": Run("fp32, 1-ulp nudge", nudged, args),
        "bf16 + 2-byte master": Run("bf16 + 2-byte master", copy.deepcopy(bf16), args, master_weights="split"),
        "bf16 + 2-byte master + bf16 moments": Run("bf16 + 2-byte master + bf16 moments", copy.deepcopy(bf16), args,
                                                   master_weights="split", state_dtype=torch.bfloat16),
    }
    trackers = {  # (tracker, the run whose gradients it takes)
        "fp32 + bf16 moments, tracking": (Run("t1", copy.deepcopy(start), args, state_dtype=torch.bfloat16), "fp32"),
        "bf16 + 2-byte master + bf16 moments, tracking": (
            Run("t2", copy.deepcopy(bf16), args, master_weights="split", state_dtype=torch.bfloat16),
            "bf16 + 2-byte master"),
    }
    watched = {name: _grads_watcher(runs[name]) for name in {src for _, src in trackers.values()}}
    began = time.perf_counter()
    for step in range(args.steps):
        x, y = data.batch(step, 0)
        for run in runs.values():
            run.step(x, y, args.max_grad_norm)
        for tracker, source in trackers.values():
            tracker.step(x, y, args.max_grad_norm, grads=watched[source])
        if step % 50 == 0:
            print(f"step {step}: " + ", ".join(f"{n} {r.losses[-1]:.3f}" for n, r in runs.items()), flush=True)
    val = data.val_batches(8)
    result = {"steps": args.steps, "num_params": sum(p.numel() for p in start.parameters()),
              "seconds": time.perf_counter() - began, "runs": {}}
    pairs = [(name, run, runs["bf16 + 2-byte master" if name.startswith("bf16") else "fp32"])
             for name, run in runs.items()]
    pairs += [(name, tracker, runs[source]) for name, (tracker, source) in trackers.items()]
    for name, run, ref in pairs:
        moved = distance(ref.model, bf16 if name.startswith("bf16") else start)
        result["runs"][name] = {
            "compared_with": ref.name,
            "final_train_loss_50": sum(run.losses[-50:]) / len(run.losses[-50:]) if run.losses else None,
            "val_loss": train_gpt.evaluate(run.model, val, torch.device("cpu")),
            "param_distance_relative_to_movement": distance(run.model, ref.model) / moved,
            "max_loss_gap": max((abs(a - b) for a, b in zip(run.losses, ref.losses)), default=None),
            "losses": run.losses,
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print("| run | train loss (last 50 steps) | val loss | drift ‖θ − θ_ref‖ / ‖θ_ref − θ₀‖ | ref |")
    print("|---|---|---|---|---|")
    for name, r in result["runs"].items():
        train = "—" if r["final_train_loss_50"] is None else f"{r['final_train_loss_50']:.4f}"
        print(f"| {name} | {train} | {r['val_loss']:.4f} | {r['param_distance_relative_to_movement']:.2e} | "
              f"{r['compared_with']} |")
    print(f"{result['num_params']:,} params, {args.steps} steps, {result['seconds']:.0f} s")
    _plot(result, REPO / "docs" / "figures" / "state_quality.png")


def _plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in result["runs"].items():
        if r["losses"]:
            smooth = [sum(r["losses"][max(0, i - 19):i + 1]) / len(r["losses"][max(0, i - 19):i + 1])
                      for i in range(len(r["losses"]))]
            ax.plot(range(1, len(smooth) + 1), smooth, linewidth=1, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (20-step mean)")
    ax.set_title(f"char GPT, {result['num_params']:,} params: moment and master storage")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()

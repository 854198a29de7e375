"""Train a small character-level GPT with ShardedFusedAdamW, checked against torch.optim.AdamW.

Run it with the project's launcher (2 CPU ranks here; ``--nproc-per-node`` = devices on a GPU/NPU box)::

    python -m launcher --nproc-per-node 2 examples/train_gpt.py            # about 2 minutes on 2 CPU cores
    python -m launcher --nproc-per-node 2 examples/train_gpt.py --steps 20 --out-dir /tmp/gpt

Every rank calls ``launcher.init_distributed()`` (gloo on CPU, nccl on CUDA, hccl on Ascend),
reads its own slice of ``examples/data/corpus.txt`` and trains the same GPT; the optimizer
shards Adam's state over the ranks and averages gradients like DDP (the model is not wrapped
in DDP). Rank 0 shows a progress bar and at the end writes ``loss.png`` and ``summary.json``
to ``--out-dir`` and prints a summary: loss, throughput, optimizer memory per rank next to
what unsharded ``torch.optim.AdamW`` + DDP would hold, and a parity check.

[Note: parity check]
Rank 0 also trains a copy of the model alone with ``torch.optim.AdamW(fused=True)``, no
distributed code involved: each step it computes every rank's micro-batch gradient (it can
rebuild any rank's batch), averages them, clips them with ``torch.nn.utils.clip_grad_norm_``
and steps the same LR schedule. The gradients are computed at the sharded model's current
weights (copied into a scratch model), not at the copy's own: training is chaotic, and a
one-ulp change to a single weight grew to a 2e-3 parameter difference within 40 steps of
plain torch AdamW here, so two models that each compute their own gradients cannot be
compared after a few hundred steps. Fed the same gradients, any difference comes from the
optimizers alone. Only rank 0 pays (its step costs about ``world_size + 1`` times as much,
the other ranks wait); ``--no-parity`` turns it off. Exit status 1 if the check fails.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

import launcher
from sharded_fused_adam import ShardedFusedAdamW

DATA = Path(__file__).resolve().parent / "data" / "corpus.txt"

# [Note: parity tolerance] Both optimizers see the same per-rank gradients but not quite the
# same arithmetic: above 2 ranks the cross-rank sum is rounded in another order, and the
# global norm for clipping is accumulated shard by shard rather than tensor by tensor, so the
# clip factors differ in the last bit. Without a feedback loop (see [Note: parity check]) such
# differences stay at rounding level: measured here, 0 (bitwise) at 2 ranks without
# clipping and 3.6e-7 (3 ulps of a weight near 1) with clipping active, after 20 steps as
# after 250, at 2 and at 3 ranks. 1e-5 leaves room for longer runs and is far below real
# bugs: one Adam update moves a weight by up to lr (3e-3), and dropping the weight decay in
# the reference shows up as 2e-4 within 10 steps.
PARITY_TOLERANCE = 1e-5
BETAS = (0.9, 0.95)


@dataclass(frozen=True)
class GPTConfig:
    """The model's shape."""

    vocab_size: int
    context: int = 64
    d_model: int = 128
    num_layers: int = 4
    num_heads: int = 4

    def __post_init__(self) -> None:
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})")


# ---- the model ---------------------------------------------------------------------------
class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position t only sees positions <= t."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model)
        mask = torch.ones(config.context, config.context, dtype=torch.bool).triu(diagonal=1)
        self.register_buffer("future", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=2)
        # (batch, heads, length, head_dim)
        q, k, v = (t.view(batch, length, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(self.future[:length, :length], float("-inf"))
        out = scores.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    """Pre-norm transformer block: attention then a 4x MLP, each around a residual."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.norm2 = nn.LayerNorm(config.d_model)
        self.mlp = nn.Sequential(nn.Linear(config.d_model, 4 * config.d_model), nn.GELU(),
                                 nn.Linear(4 * config.d_model, config.d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """A decoder-only transformer whose output head shares the token embedding's weight."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.positions = nn.Embedding(config.context, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.head.weight = self.tokens.weight  # tied: one parameter, two uses
        for name, p in self.named_parameters():
            if p.dim() == 2:
                # GPT-2's init; residual projections scaled down by depth.
                std = 0.02 / math.sqrt(2 * config.num_layers) if name.endswith(("proj.weight", "2.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        """Next-character scores, (batch, length, vocab_size), for token ids (batch, length)."""
        x = self.tokens(idx) + self.positions(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean cross-entropy of predicting ``targets`` (idx shifted by one)."""
        logits = self.logits(idx)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (and the tied embedding); not biases, LayerNorms or positions."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() == 2 and not name.startswith("positions") else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---- the data ----------------------------------------------------------------------------
class CharData:
    """The corpus as character ids, cut into windows that are dealt to ranks like DistributedSampler.

    Each epoch shuffles all non-overlapping training windows with ``seed + epoch``; rank r
    takes every world_size-th window starting at r, so the ranks' data never overlap and any
    rank can rebuild any other rank's batch (the parity check needs that).
    """

    def __init__(self, text: str, *, context: int, batch_size: int, world_size: int, seed: int):
        self.chars = sorted(set(text))
        lookup = {c: i for i, c in enumerate(self.chars)}
        data = torch.tensor([lookup[c] for c in text], dtype=torch.long)
        split = int(0.9 * len(data))
        self.train, self.val = data[:split], data[split:]
        self.context, self.batch_size, self.world_size, self.seed = context, batch_size, world_size, seed
        self.num_windows = (len(self.train) - 1) // context
        self.steps_per_epoch = self.num_windows // (world_size * batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError(f"the corpus has {self.num_windows} windows of {context} characters, fewer than one "
                             f"global batch ({world_size} ranks x {batch_size})")
        self._order: tuple[int, torch.Tensor] = (-1, torch.empty(0))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def _windows(self, epoch: int) -> torch.Tensor:
        if self._order[0] != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._order = (epoch, torch.randperm(self.num_windows, generator=g))
        return self._order[1]

    def batch(self, step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rank ``rank``'s (inputs, targets) at ``step``, each of shape (batch_size, context)."""
        epoch, index = divmod(step, self.steps_per_epoch)
        mine = self._windows(epoch)[rank::self.world_size]
        starts = mine[index * self.batch_size:(index + 1) * self.batch_size] * self.context
        offsets = torch.arange(self.context + 1)
        chunk = self.train[starts[:, None] + offsets]
        return chunk[:, :-1], chunk[:, 1:]

    def val_batches(self, num_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Fixed validation batches (the same on every rank)."""
        g = torch.Generator().manual_seed(self.seed - 1)
        batches = []
        for _ in range(num_batches):
            starts = torch.randint(0, len(self.val) - self.context - 1, (self.batch_size,), generator=g)
            chunk = self.val[starts[:, None] + torch.arange(self.context + 1)]
            batches.append((chunk[:, :-1], chunk[:, 1:]))
        return batches


# ---- the parity reference (rank 0) -------------------------------------------------------
class Reference:
    """One process, every rank's batch, torch.optim.AdamW(fused=True): see [Note: parity check]."""

    def __init__(self, model: GPT, args: argparse.Namespace, world_size: int):
        self.model = copy.deepcopy(model)          # the params torch's AdamW updates
        self.probe = copy.deepcopy(model)          # where the gradients are computed
        self.world_size = world_size
        self.max_grad_norm = args.max_grad_norm
        self.opt = torch.optim.AdamW(param_groups(self.model, args.weight_decay), lr=args.lr,
                                     betas=BETAS, fused=True)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(args))
        self.seconds = 0.0

    def step(self, data: CharData, step: int, weights: GPT) -> None:
        """One AdamW step on the average of every rank's gradient at ``weights`` (the sharded
        model before its step: the weights each rank computes its gradient at)."""
        start = time.perf_counter()
        with torch.no_grad():
            for mine, theirs in zip(self.probe.parameters(), weights.parameters()):
                mine.copy_(theirs)
        probe_params = list(self.probe.parameters())
        total: list[Optional[torch.Tensor]] = [None] * len(probe_params)
        for rank in range(self.world_size):  # every rank's micro-batch, summed in rank order
            self.probe.zero_grad(set_to_none=True)
            x, y = (t.to(probe_params[0].device) for t in data.batch(step, rank))
            self.probe(x, y).backward()
            for i, p in enumerate(probe_params):
                total[i] = p.grad.clone() if total[i] is None else total[i] + p.grad
        for p, g in zip(self.model.parameters(), total):
            p.grad = g / self.world_size
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.opt.step()
        self.sched.step()
        self.seconds += time.perf_counter() - start

    def max_abs_diff(self, model: GPT) -> float:
        return max((a.detach() - b.detach()).abs().max().item()
                   for a, b in zip(model.parameters(), self.model.parameters()))


# ---- training ----------------------------------------------------------------------------
def lr_lambda(args: argparse.Namespace) -> Callable[[int], float]:
    """Linear warm-up over the first 5% of steps, then cosine decay to 10%."""
    warmup = max(1, args.steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


@torch.no_grad()
def sample(model: GPT, data: CharData, *, prompt: str, num_chars: int, seed: int) -> str:
    """Continue ``prompt`` by sampling the model (temperature 0.8, fixed seed)."""
    model.eval()
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    ids = [data.chars.index(c) for c in prompt]
    for _ in range(num_chars):
        idx = torch.tensor([ids[-model.config.context:]], device=device)
        logits = model.logits(idx)[0, -1].float().cpu()
        ids.append(int(torch.multinomial((logits / 0.8).softmax(-1), 1, generator=g)))
    model.train()
    return "".join(data.chars[i] for i in ids)


@torch.no_grad()
def evaluate(model: GPT, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> float:
    model.eval()
    losses = [model(x.to(device), y.to(device)).item() for x, y in batches]
    model.train()
    return sum(losses) / len(losses)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    parser.add_argument("--out-dir", type=Path, default=Path("outputs"), help="where loss.png and summary.json go")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per rank per step")
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--parity", action=argparse.BooleanOptionalAction, default=True,
                        help="train the single-process torch.optim.AdamW reference on rank 0 (default on)")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    return args


def main() -> None:
    args = parse_args()
    device = launcher.init_distributed()
    try:
        passed = train(args, device)
    finally:
        dist.destroy_process_group()
    if not passed:
        raise SystemExit("parity check failed: see the summary above")


def train(args: argparse.Namespace, device: torch.device) -> bool:
    """Train, then (rank 0) write the outputs; False if rank 0's parity check failed."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    data = CharData(args.data.read_text(encoding="utf-8"), context=args.context, batch_size=args.batch_size,
                    world_size=world_size, seed=args.seed)
    config = GPTConfig(data.vocab_size, args.context, args.d_model, args.layers, args.heads)
    torch.manual_seed(args.seed)
    model = GPT(config).to(device)
    for p in model.parameters():  # start every rank from rank 0's weights, as DDP does
        dist.broadcast(p.data, src=0)
    reference = Reference(model, args, world_size) if args.parity and rank == 0 else None
    opt = ShardedFusedAdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=BETAS)
    losses, train_seconds = train_loop(args, data, model, opt, reference)

    val_loss = evaluate(model, data.val_batches(8), device)
    reports: list[Any] = [None] * world_size
    dist.all_gather_object(reports, opt.memory_report().as_dict())
    if rank != 0:
        return True
    tokens_per_s = world_size * args.batch_size * args.context * args.steps / train_seconds
    summary = _summary(args, config, model, opt, reference, losses, val_loss, reports, tokens_per_s,
                       train_seconds, world_size)
    summary["sample"] = sample(model, data, prompt="Chapter", num_chars=200, seed=args.seed)
    _write_outputs(args.out_dir, summary)
    return summary.get("parity", {}).get("passed", True)


def train_loop(args: argparse.Namespace, data: CharData, model: GPT, opt: ShardedFusedAdamW,
               reference: Optional[Reference]) -> tuple[list[float], float]:
    """The data-parallel loop; returns the loss of each step (mean over ranks) and the seconds
    spent in it outside the parity reference."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = next(model.parameters()).device
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args))
    tokens_per_step = world_size * args.batch_size * args.context
    losses: list[float] = []
    seconds = 0.0
    bar = _progress(args.steps, rank)
    for step in range(args.steps):
        if reference is not None:
            reference.step(data, step, model)  # before our step: the weights this step's gradients see
        start = time.perf_counter()
        x, y = (t.to(device) for t in data.batch(step, rank))
        loss = model(x, y)
        loss.backward()                        # gradients are averaged into the optimizer's shards
        opt.clip_grad_norm_(args.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        losses.append(mean_loss.item() / world_size)
        seconds += time.perf_counter() - start
        if bar is not None:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tokens_per_step * (step + 1) / seconds:,.0f}")
            bar.update()
    if bar is not None:
        bar.close()
    return losses, seconds


_EXTRA_HINT = "this example needs tqdm and matplotlib: pip install -e '.[examples]'"


def _progress(steps: int, rank: int) -> Optional[Any]:
    """A tqdm bar on rank 0, None elsewhere."""
    if rank != 0:
        return None
    try:
        from tqdm import tqdm
    except ImportError as err:
        raise ImportError(_EXTRA_HINT) from err
    return tqdm(total=steps, desc="train", unit="step", dynamic_ncols=True, mininterval=1.0)


# ---- the summary -------------------------------------------------------------------------
def _unsharded_bytes(model: nn.Module) -> dict[str, int]:
    """What torch.optim.AdamW + DDP hold on every rank for the same params (nothing sharded)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    # Full .grad tensors, exp_avg + exp_avg_sq, and DDP's reduction buckets: with its default
    # gradient_as_bucket_view=False these are as large as the gradients again.
    return {"params": params, "grads": params, "optimizer_state": 2 * params, "comm_buffers": params,
            "total": 5 * params}


def _summary(args: argparse.Namespace, config: GPTConfig, model: GPT, opt: ShardedFusedAdamW,
             reference: Optional[Reference], losses: list[float], val_loss: float, reports: list,
             tokens_per_s: float, train_seconds: float, world_size: int) -> dict[str, Any]:
    window = max(1, min(10, len(losses) // 4))
    summary: dict[str, Any] = {
        "world_size": world_size,
        "backend": dist.get_backend(),
        "device": str(next(model.parameters()).device),
        "steps": args.steps,
        "config": asdict(config),
        "num_params": sum(p.numel() for p in model.parameters()),
        "first_loss": sum(losses[:window]) / window,
        "final_loss": sum(losses[-window:]) / window,
        "loss_window": window,
        "val_loss": val_loss,
        "tokens_per_s": tokens_per_s,
        "train_seconds": train_seconds,
        "losses": losses,
        "memory": {"sharded_per_rank": reports, "unsharded_adam_ddp_per_rank": _unsharded_bytes(model)},
        "last_step_comm_bytes": opt.last_step_comm_bytes,
    }
    if reference is not None:
        diff = reference.max_abs_diff(model)
        summary["parity"] = {"max_abs_diff": diff, "tolerance": PARITY_TOLERANCE, "passed": diff <= PARITY_TOLERANCE,
                             "reference": "torch.optim.AdamW(fused=True), one process, all ranks' batches",
                             "reference_seconds": reference.seconds}
    return summary


_MEMORY_COLUMNS = ("params", "gradients", "Adam state", "comm buffers", "total")


def _write_outputs(out_dir: Path, summary: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    _plot(summary["losses"], out_dir / "loss.png", summary)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    full = summary["memory"]["unsharded_adam_ddp_per_rank"]
    lines = [
        f"trained {summary['num_params']:,} params for {summary['steps']} steps on {summary['world_size']} "
        f"rank{'s' if summary['world_size'] > 1 else ''} ({summary['backend']}, {summary['device']})",
        f"loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f} (mean of first/last "
        f"{summary['loss_window']} steps), validation loss {summary['val_loss']:.3f}",
        f"throughput {summary['tokens_per_s']:,.0f} tokens/s over all ranks "
        f"({summary['train_seconds']:.1f} s of training, parity reference excluded)",
        f"  {'memory per rank, MiB':<20}" + "".join(f"{h:>13}" for h in _MEMORY_COLUMNS),
    ]
    rows = [(f"ShardedFusedAdamW r{rank}", report, report["grad_shards"])
            for rank, report in enumerate(summary["memory"]["sharded_per_rank"])]
    rows.append(("torch AdamW + DDP", full, full["grads"]))
    for label, report, grads in rows:
        cells = (report["params"], grads, report["optimizer_state"], report["comm_buffers"], report["total"])
        lines.append(f"  {label:<20}" + "".join(f"{n / 2**20:>13.2f}" for n in cells))
    if "parity" in summary:
        parity = summary["parity"]
        lines.append(f"parity vs single-process torch.optim.AdamW(fused=True): max |param diff| "
                     f"{parity['max_abs_diff']:.3g} (tolerance {parity['tolerance']:g}): "
                     f"{'PASSED' if parity['passed'] else 'FAILED'}")
    lines.append("sample: " + summary["sample"].replace("\n", " ")[:200])
    lines.append(f"wrote {out_dir / 'loss.png'} and {out_dir / 'summary.json'}")
    print("\n".join(lines), flush=True)


def _plot(losses: list[float], path: Path, summary: dict[str, Any]) -> None:
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError(_EXTRA_HINT) from err
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(losses) + 1), losses, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean over ranks)")
    ax.set_title(f"char GPT, {summary['num_params']:,} params, ShardedFusedAdamW on "
                 f"{summary['world_size']} ranks")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()

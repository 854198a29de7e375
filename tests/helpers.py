"""Shared test models and the single-process reference trainer (torch.optim.Adam, fused)."""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn

from sharded_fused_adam import ShardedFusedAdam


class OddNet(nn.Module):
    """A small net with ragged shapes (numels not multiples of 16) and one unused layer."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(37, 13)
        self.fc1 = nn.Linear(13, 29)
        self.norm = nn.LayerNorm(29)
        self.fc2 = nn.Linear(29, 16)
        self.head = nn.Linear(16, 5)
        self.unused = nn.Linear(3, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens).mean(dim=1)
        h = torch.nn.functional.gelu(self.norm(self.fc1(h)))
        return self.head(torch.tanh(self.fc2(h)))


def make_net(seed: int = 0) -> OddNet:
    torch.manual_seed(seed)
    return OddNet()


def batch(step: int, rank: int, *, same_on_all_ranks: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + (0 if same_on_all_ranks else rank + 1))
    tokens = torch.randint(0, 37, (8, 6), generator=g)
    target = torch.randn(8, 5, generator=g)
    return tokens, target


def loss_fn(model: nn.Module, tokens: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(tokens), target)


def param_groups(model: nn.Module, spec: str) -> Any:
    """``"one"``: all params in one group; ``"two"``: weights vs the rest with their own lr/decay;
    ``"custom"``: two groups whose lr, betas, eps and weight decay are all off torch's defaults
    and differ between the groups (the second takes its betas from the optimizer's defaults)."""
    if spec == "one":
        return list(model.parameters())
    weights = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() == 2]
    others = [p for n, p in model.named_parameters() if not (n.endswith("weight") and p.dim() == 2)]
    if spec == "custom":
        return [{"params": weights, "lr": 4e-3, "betas": (0.8, 0.95), "eps": 1e-4, "weight_decay": 0.05},
                {"params": others, "lr": 7e-3, "eps": 3e-3, "weight_decay": 0.2}]
    return [{"params": weights, "weight_decay": 0.05}, {"params": others, "lr": 3e-3, "weight_decay": 0.0}]


def averaged_grads(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list:
    """The per-param gradient averaged over ``batches`` (one per rank), None where never produced."""
    total: list = [None] * len(list(model.parameters()))
    for tokens, target in batches:
        model.zero_grad(set_to_none=True)
        loss_fn(model, tokens, target).backward()
        for i, p in enumerate(model.parameters()):
            if p.grad is not None:
                total[i] = p.grad.clone() if total[i] is None else total[i] + p.grad
    model.zero_grad(set_to_none=True)
    return [None if t is None else t / len(batches) for t in total]


def train_pair(
    rank: int,
    world_size: int,
    *,
    steps: int,
    same_on_all_ranks: bool,
    groups: str = "one",
    opt_kwargs: dict | None = None,
    sharded_kwargs: dict | None = None,
    scheduler: Callable | None = None,
) -> float:
    """Train ShardedFusedAdam on this rank and torch.optim.Adam(fused=True) on the averaged
    gradients in-process, side by side; return the max |difference| over params and steps."""
    opt_kwargs = dict(opt_kwargs or {})
    adamw = opt_kwargs.pop("adamw", False)
    model = make_net()
    ref = copy.deepcopy(model)
    opt = ShardedFusedAdam(param_groups(model, groups), adamw=adamw, **opt_kwargs, **(sharded_kwargs or {}))
    ref_cls = torch.optim.AdamW if adamw else torch.optim.Adam
    ref_kwargs = dict(opt_kwargs)
    if adamw:
        ref_kwargs.setdefault("weight_decay", 0.0)
    ref_opt = ref_cls(param_groups(ref, groups), fused=True, **ref_kwargs)
    scheds = [scheduler(opt), scheduler(ref_opt)] if scheduler else []
    worst = 0.0
    for step in range(steps):
        batches = [batch(step, r, same_on_all_ranks=same_on_all_ranks) for r in range(world_size)]
        opt.zero_grad()
        loss_fn(model, *batches[rank]).backward()
        opt.step()
        if same_on_all_ranks:
            grads = averaged_grads(ref, batches[:1])
        else:
            grads = averaged_grads(ref, batches)
        for p, g in zip(ref.parameters(), grads):
            p.grad = g
        ref_opt.step()
        for s in scheds:
            s.step()
        for a, b in zip(model.parameters(), ref.parameters()):
            worst = max(worst, (a.detach() - b.detach()).abs().max().item())
    return worst

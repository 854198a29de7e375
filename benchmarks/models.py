"""The benchmark model (a GPT-like MLP stack with a tied head) and its deterministic random batches."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ModelSpec", "GPTLike", "BatchSpec", "make_batches", "parse_batch"]


@dataclass(frozen=True)
class ModelSpec:
    """Sizes of ``GPTLike``; the default is the 16.8M-param benchmark model."""

    vocab: int = 8192
    dim: int = 512
    hidden: int = 2048
    num_blocks: int = 6

    def __post_init__(self) -> None:
        for name in ("vocab", "dim", "hidden", "num_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelSpec.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def num_params(self) -> int:
        block = (self.dim * self.hidden + self.hidden) + (self.hidden * self.dim + self.dim) + 2 * self.dim
        return self.vocab * self.dim + self.num_blocks * block


class _Block(nn.Module):
    """Linear(dim->hidden), GELU, Linear(hidden->dim), LayerNorm, around a residual connection."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc_in = nn.Linear(dim, hidden)
        self.fc_out = nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h + self.fc_out(F.gelu(self.fc_in(h))))


class GPTLike(nn.Module):
    """Token embedding, ``num_blocks`` MLP blocks, and a head tied to the embedding.

    ``forward(tokens, targets)`` returns the mean cross-entropy of ``h @ emb.weight.T``.
    """

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.emb = nn.Embedding(spec.vocab, spec.dim)
        self.blocks = nn.ModuleList(_Block(spec.dim, spec.hidden) for _ in range(spec.num_blocks))

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens)
        for block in self.blocks:
            h = block(h)
        logits = h @ self.emb.weight.t()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@dataclass(frozen=True)
class BatchSpec:
    """``batch`` sequences of ``seq`` tokens per rank per step."""

    batch: int
    seq: int

    def __post_init__(self) -> None:
        if self.batch < 1 or self.seq < 1:
            raise ValueError(f"batch and seq must be >= 1, got {self.batch}x{self.seq}")

    @property
    def label(self) -> str:
        return f"{self.batch}x{self.seq}"


def parse_batch(text: str) -> BatchSpec:
    """``"8x64"`` -> ``BatchSpec(8, 64)``.

    Raises:
        ValueError: ``text`` is not ``<batch>x<seq>`` with positive integers.
    """
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"a batch must look like 8x64 (batch x sequence length), got {text!r}")
    return BatchSpec(int(parts[0]), int(parts[1]))


def make_batches(
    spec: BatchSpec, vocab: int, num_steps: int, *, rank: int, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random (tokens, targets) for each step; the same on every call for the same rank and seed.

    Every configuration trains on this same list, so their final params are comparable;
    ranks get different data, as in real data parallelism.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + rank)
    shape = (spec.batch, spec.seq)
    return [(torch.randint(vocab, shape, generator=gen), torch.randint(vocab, shape, generator=gen))
            for _ in range(num_steps)]

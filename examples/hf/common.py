"""A 2-layer GPT-2 built from its config and a synthetic token data set: no downloads."""
from __future__ import annotations

import torch
import transformers

SEQ, VOCAB = 16, 64


def tiny_gpt2() -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB,
                                                                n_positions=SEQ))


class Tokens(torch.utils.data.Dataset):
    """Sequences where each token predicts the next (``start + i * stride``, modulo the vocabulary)."""

    def __init__(self, n: int = 256):
        g = torch.Generator().manual_seed(1)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        self.ids = (start + torch.arange(SEQ) * torch.randint(1, 4, (n, 1), generator=g)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}

"""An Accelerate loop with ShardedFusedAdamW: prepare, accumulate, backward, clip_grad_norm_.

    torchrun --nproc-per-node 2 examples/hf/train_accelerate.py
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from accelerate import Accelerator

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Tokens, tiny_gpt2  # noqa: E402

from sharded_fused_adam.integrations import accelerate as sfa_acc  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    cli = parser.parse_args()
    accelerator = Accelerator(gradient_accumulation_steps=2, cpu=not torch.cuda.is_available())
    model = tiny_gpt2()
    optimizer = sfa_acc.make_optimizer(accelerator, model.parameters(), lr=3e-3, weight_decay=0.1)
    loader = torch.utils.data.DataLoader(Tokens(), batch_size=4, shuffle=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    losses, step = [], 0
    while step < cli.steps:
        for batch in loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    norm = accelerator.clip_grad_norm_(model.parameters(), 1.0)
                    losses.append(loss.item())
                    step += 1
                optimizer.step()
                optimizer.zero_grad()
            if step == cli.steps:
                break
    accelerator.print(f"world_size={accelerator.num_processes} first_loss={losses[0]:.4f} "
                      f"final_loss={losses[-1]:.4f} last_grad_norm={norm.item():.4f}")


if __name__ == "__main__":
    main()

"""The Hugging Face Trainer with ShardedFusedAdamW, with or without a DeepSpeed config.

    torchrun --nproc-per-node 2 examples/hf/train_trainer.py                   # Trainer + DDP
    DS_ACCELERATOR=cpu torchrun --nproc-per-node 2 examples/hf/train_trainer.py \\
        --deepspeed examples/hf/ds_config_trainer.json                         # Trainer + DeepSpeed stage 0
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Tokens, tiny_gpt2  # noqa: E402

from sharded_fused_adam.integrations import deepspeed as sfa_ds  # noqa: E402
from sharded_fused_adam.integrations import transformers as sfa_hf  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--deepspeed", default=None, help="a DeepSpeed config naming \"ShardedFusedAdam(W)\"")
    parser.add_argument("--out-dir", default="outputs/hf_trainer")
    cli, _ = parser.parse_known_args()
    cpu = not torch.cuda.is_available()
    args = transformers.TrainingArguments(
        output_dir=cli.out_dir, max_steps=cli.steps, per_device_train_batch_size=4, learning_rate=3e-3,
        weight_decay=0.1, max_grad_norm=1.0, logging_steps=5, save_steps=max(1, cli.steps // 2), report_to="none",
        # On a CPU-only machine the Trainer needs use_cpu=True for DDP; under DeepSpeed it must stay False.
        use_cpu=cpu and cli.deepspeed is None,
        deepspeed=sfa_ds.register(cli.deepspeed) if cli.deepspeed else None)
    trainer = sfa_hf.Trainer(model=tiny_gpt2(), args=args, train_dataset=Tokens())
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    norms = [e.get("grad_norm") for e in trainer.state.log_history if "loss" in e]
    if args.process_index == 0:
        print(f"optimizer={type(getattr(trainer.optimizer, 'optimizer', trainer.optimizer)).__name__} "
              f"world_size={args.world_size} first_loss={losses[0]:.4f} final_loss={losses[-1]:.4f} "
              f"grad_norms={norms}")


if __name__ == "__main__":
    main()

"""A DeepSpeed training script whose config says ``"type": "ShardedFusedAdam"``.

    deepspeed --num_gpus 2 examples/deepspeed/train.py --deepspeed_config examples/deepspeed/ds_config_sharded.json
    torchrun --nproc-per-node 2 examples/deepspeed/train.py --deepspeed_config examples/deepspeed/ds_config_zero2.json

(On a CPU-only machine set ``DS_ACCELERATOR=cpu``.) The only change from a stock DeepSpeed
script is the ``initialize`` import: ``sfa_ds.initialize`` registers the optimizer name,
checks the config and wires the engine. ``ds_config_sharded.json`` (ZeRO stage 0) lets
ShardedFusedAdam shard, reduce and clip; ``ds_config_zero2.json`` (stage 2) lets DeepSpeed
shard and runs our fused Adam on its partitions. The model is a small next-character
predictor on ``examples/data/corpus.txt``; each rank draws its own batches.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from sharded_fused_adam.integrations import deepspeed as sfa_ds

CORPUS = Path(__file__).resolve().parents[1] / "data" / "corpus.txt"
CONTEXT = 8


class CharMLP(nn.Module):
    """Predicts the next character from the previous ``CONTEXT`` ones."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 24)
        self.body = nn.Sequential(nn.Linear(CONTEXT * 24, 256), nn.GELU(), nn.LayerNorm(256), nn.Linear(256, vocab))

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        return self.body(self.embed(context).flatten(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deepspeed_config", required=True, help="a DeepSpeed JSON config")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--summary", type=Path, help="write a JSON summary here (rank 0)")
    parser.add_argument("--save-dir", type=Path, help="engine.save_checkpoint here at the end")
    args, _ = parser.parse_known_args()  # the deepspeed launcher appends --local_rank=N

    raw = torch.frombuffer(bytearray(CORPUS.read_bytes()), dtype=torch.uint8).long()
    chars = torch.unique(raw)
    data = torch.zeros(256, dtype=torch.long).index_copy_(0, chars, torch.arange(len(chars)))[raw]
    torch.manual_seed(0)  # the same initial weights on every rank
    model = CharMLP(len(chars))

    engine, optimizer, _, _ = sfa_ds.initialize(args=args, model=model,
                                                model_parameters=model.parameters())
    rank, world_size = engine.global_rank, engine.world_size
    batch = engine.train_micro_batch_size_per_gpu()
    g = torch.Generator().manual_seed(1000 + rank)
    losses = []
    for step in range(args.steps):
        starts = torch.randint(0, len(data) - CONTEXT - 1, (batch,), generator=g)
        context = torch.stack([data[s:s + CONTEXT] for s in starts.tolist()]).to(engine.device)
        target = data[starts + CONTEXT].to(engine.device)
        loss = nn.functional.cross_entropy(engine(context), target)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {loss.item():.4f}  lr {engine.get_lr()[0]:.2e}  "
                  f"grad norm {engine.get_global_grad_norm():.3f}", flush=True)
    if args.save_dir is not None:
        engine.save_checkpoint(str(args.save_dir))

    mode = "sharded" if engine.zero_optimization_stage() == 0 else "delegated"
    if rank == 0:
        print(f"done: {mode} mode, ZeRO stage {engine.zero_optimization_stage()}, {world_size} ranks, "
              f"optimizer {type(engine.basic_optimizer).__name__}", flush=True)
        if args.summary is not None:
            args.summary.write_text(json.dumps({
                "mode": mode, "world_size": world_size, "optimizer": type(engine.basic_optimizer).__name__,
                "wrapper": type(optimizer).__name__, "losses": losses,
            }))


if __name__ == "__main__":
    main()

"""One rank of a Lightning job (started by torchrun from tests/test_hf_integrations.py).

``lightning.Trainer(strategy="ddp", accelerator="cpu", gradient_clip_val=1.0)`` trains a
2-layer GPT-2 (built from its config) whose ``configure_optimizers`` returns
``ShardedFusedAdamW(self.parameters())`` (no other glue) or ``torch.optim.AdamW(fused=True)``,
for 2 epochs of 10 steps, checkpointing at each epoch's end. ``fit``: both optimizers, from
scratch; ``resume``: a new launch that resumes ours from the first epoch's checkpoint. Each
rank writes ``<out>/<phase>_rank<r>.pt`` with the final params (the parent compares).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import sys  # noqa: E402

import lightning as L  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hf_worker import make_model, params_of  # noqa: E402
from common import Tokens  # noqa: E402  (hf_worker put examples/hf on the path)


class TinyGPT(L.LightningModule):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.model = make_model()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.kind == "ours":
            from sharded_fused_adam import ShardedFusedAdamW

            return ShardedFusedAdamW(self.parameters(), lr=3e-3, weight_decay=0.1)
        return torch.optim.AdamW(self.parameters(), lr=3e-3, weight_decay=0.1, fused=True)


def fit(kind: str, out: Path, resume: bool) -> dict[str, torch.Tensor]:
    module = TinyGPT(kind)
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=str(out / f"ckpt_{kind}"), save_top_k=-1,
                                                      every_n_epochs=1, save_on_train_epoch_end=True,
                                                      filename="{epoch}")
    trainer = L.Trainer(accelerator="cpu", devices=int(os.environ["WORLD_SIZE"]), strategy="ddp", max_epochs=2,
                        gradient_clip_val=1.0, callbacks=[checkpoints], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, deterministic=True)
    loader = torch.utils.data.DataLoader(Tokens(40), batch_size=2, shuffle=False)
    trainer.fit(module, loader, ckpt_path=str(out / f"ckpt_{kind}" / "epoch=0.ckpt") if resume else None)
    return params_of(module.model)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("phase", choices=("fit", "resume"))
    parser.add_argument("--out", type=Path, required=True)
    args, _ = parser.parse_known_args()
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    if args.phase == "fit":
        result = {"ours": fit("ours", args.out, False), "torch": fit("torch", args.out, False)}
    else:
        result = {"ours": fit("ours", args.out, True)}
    tmp = args.out / f".{args.phase}_rank{rank}.pt"
    torch.save(result, tmp)
    tmp.rename(args.out / f"{args.phase}_rank{rank}.pt")


if __name__ == "__main__":
    main()

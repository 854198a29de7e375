"""One rank of a DeepSpeed job for tests/test_convert_deepspeed.py (started by torchrun).

DeepSpeed's own Adam (``"torch_adam": true, "fused": true``: torch's fused Adam on each
partition) trains a small model; every rank feeds the whole global batch, so the averaged
gradient is the same at every world size and continuations can be compared bit for bit.

* ``write``: for each config (stage 0 Adam, stage 1 AdamW, stage 2 Adam + amsgrad) train
  ``BEFORE`` steps, save the engine checkpoint ``<out>/ds/<name>``, record DeepSpeed's own view
  of every param's full optimizer state (``safe_get_full_optimizer_state``), train ``AFTER``
  more steps and record the params: ``<out>/ref_<name>.pt``.
* ``resume <name>...``: build each config's engine, ``load_checkpoint`` from
  ``<out>/export/<name>`` (``load_universal`` for names ending in ``_universal``), record the
  loaded state and the params after ``AFTER`` steps: ``<out>/resumed_<name>_w<world>.pt``.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from deepspeed_worker import Net, make_net  # noqa: F401  (the same ragged model as the DeepSpeed tests)

BEFORE, AFTER = 3, 3
GLOBAL_BATCH = 6
LR = 1e-2




def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(500 + step)
    x = torch.randn(GLOBAL_BATCH, 13, generator=g)
    return x, torch.tanh(x @ torch.randn(13, 5, generator=torch.Generator().manual_seed(3)))


CONFIGS: dict[str, tuple[int, dict[str, Any]]] = {
    "z0": (0, {"lr": LR, "weight_decay": 0.01, "adam_w_mode": False}),
    "z1": (1, {"lr": LR, "weight_decay": 0.05, "adam_w_mode": True}),
    "z2": (2, {"lr": LR, "weight_decay": 0.0, "adam_w_mode": False, "amsgrad": True}),
}


def config(name: str, universal: bool = False) -> dict[str, Any]:
    stage, params = CONFIGS[name]
    cfg = {"train_micro_batch_size_per_gpu": GLOBAL_BATCH, "gradient_accumulation_steps": 1,
           "steps_per_print": 10**6, "gradient_clipping": 0.0, "zero_optimization": {"stage": stage},
           "optimizer": {"type": "Adam", "params": {**params, "torch_adam": True, "fused": True}}}
    if universal:
        cfg["checkpoint"] = {"load_universal": True}
    return cfg


def train(engine: Any, start: int, steps: int) -> None:
    for step in range(start, start + steps):
        x, y = batch(step)
        engine.backward(nn.functional.mse_loss(engine(x), y))
        engine.step()


def full_state(engine: Any) -> dict[str, dict[str, torch.Tensor]]:
    """DeepSpeed's own view of each param's state (a collective at stages 1/2)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    out = {}
    if engine.zero_optimization_stage() > 0:
        engine.optimizer._lazy_init_hp_params_optimizer_state()  # linked at the first step otherwise
    for name, p in engine.module.named_parameters():
        if engine.zero_optimization_stage() == 0:
            entry = {k: v.detach().clone() for k, v in engine.optimizer.state[p].items()}
        else:
            entry = {k: safe_get_full_optimizer_state(p, k).detach().clone()
                     for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
                     if k in engine.optimizer.optimizer.state[engine.optimizer.optimizer.param_groups[0]["params"][0]]}
            flat = engine.optimizer.optimizer.state[engine.optimizer.optimizer.param_groups[0]["params"][0]]
            entry["step"] = flat["step"].detach().clone()
        out[name] = entry
    return out


def params(engine: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


def run_write(out: Path, rank: int) -> None:
    import deepspeed

    for name in CONFIGS:
        engine = deepspeed.initialize(model=make_net(), config=config(name))[0]
        train(engine, 0, BEFORE)
        engine.save_checkpoint(str(out / "ds" / name), tag=f"t{BEFORE}")
        ref = {"state": full_state(engine), "params_before": params(engine)}
        train(engine, BEFORE, AFTER)
        ref["params_after"] = params(engine)
        if rank == 0:
            torch.save(ref, out / f"ref_{name}.pt")


def run_resume(out: Path, rank: int, world_size: int, names: list[str]) -> None:
    import deepspeed

    for name in names:
        universal = name.endswith("_universal")
        engine = deepspeed.initialize(model=Net(), config=config(name.removesuffix("_universal"), universal))[0]
        engine.load_checkpoint(str(out / "export" / name))
        res = {"state": full_state(engine), "params_before": params(engine), "global_steps": engine.global_steps}
        train(engine, BEFORE, AFTER)
        res["params_after"] = params(engine)
        if rank == 0:
            torch.save(res, out / f"resumed_{name}_w{world_size}.pt")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=("write", "resume"))
    parser.add_argument("names", nargs="*")
    parser.add_argument("--out", type=Path, required=True)
    args, _ = parser.parse_known_args()
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args.scenario == "write":
        run_write(args.out, rank)
    else:
        run_resume(args.out, rank, world_size, args.names)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

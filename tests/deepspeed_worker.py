"""One rank of a DeepSpeed test job (started by torchrun from tests/test_deepspeed.py).

Each scenario trains a small model through a real DeepSpeed engine on CPU (gloo) next to a
reference, checks nothing itself, and writes what it measured to ``<out>/<scenario>_rank<r>.json``
(the parent asserts; a rank that aborts at exit after writing still counts). Scenarios:

* ``sharded``: ZeRO stage 0 + ShardedFusedAdam vs DDP + torch.optim.Adam(fused=True) with the
  same clipping and LR, an overflow injected on one rank, collectives counted, a checkpoint
  saved midway and the uninterrupted end state written for ``resume``.
* ``resume``: at another world size, ``engine.load_checkpoint`` of that checkpoint, state
  compared with the saved one, training continued.
* ``delegated``: ZeRO stage 1/2 + FusedAdam vs DDP + torch.optim.Adam/AdamW(fused=True) and vs
  DeepSpeed's own Adam (``torch_adam``), and a stage-2 checkpoint round trip.

``--precisions`` names the DeepSpeed ``"fp16"`` / ``"bf16"`` sections this CPU supports (the
parent asks DeepSpeed's CPU accelerator); cases needing another are not run.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sharded_fused_adam import ShardedFusedAdam
from sharded_fused_adam.integrations import deepspeed as sfa_ds

GLOBAL_BATCH = 6  # divisible by world sizes 1, 2 and 3
LR, BETAS, WD, CLIP = 1e-2, (0.9, 0.99), 0.01, 0.5
STEPS, SAVE_AT, INJECT_AT = 8, 5, 3  # save after 5 steps; rank 1 produces an inf at step 3


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(13, 29)  # ragged sizes: buckets need padding at 2 and 3 ranks
        self.norm = nn.LayerNorm(29)
        self.fc2 = nn.Linear(29, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.norm(self.fc1(x))))


def make_net() -> Net:
    torch.manual_seed(0)
    return Net()


def local_batch(step: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(GLOBAL_BATCH, 13, generator=g)
    teacher = torch.randn(13, 5, generator=torch.Generator().manual_seed(7))
    y = torch.tanh(x @ teacher)
    per = GLOBAL_BATCH // world_size
    return x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]


@torch.no_grad()
def eval_loss(module: Any) -> float:
    """The loss on a fixed held-out batch (the training batches differ from step to step)."""
    x, y = local_batch(10**6, 0, 1)
    return nn.functional.mse_loss(module(x), y).item()


def sharded_config(world_size: int) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world_size,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 10**6,
        "optimizer": {"type": "ShardedFusedAdam",
                      "params": {"lr": LR, "betas": list(BETAS), "weight_decay": WD, "loss_scale": "dynamic"}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 1e-3, "warmup_max_lr": LR,
                                                     "warmup_num_steps": 4, "warmup_type": "linear"}},
        "gradient_clipping": CLIP,
        "zero_optimization": {"stage": 0},
    }


def max_diff(a: nn.Module, b: nn.Module) -> float:
    return max((p.detach() - q.detach()).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


@contextlib.contextmanager
def counting_collectives(calls: list) -> Iterator[None]:
    """Record ``(op, numel)`` of every all_reduce/broadcast issued through torch.distributed."""
    originals = {name: getattr(dist, name) for name in ("all_reduce", "broadcast")}

    def wrap(name: str, fn: Any) -> Any:
        def counted(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            calls.append((name, tensor.numel()))
            return fn(tensor, *args, **kwargs)
        return counted

    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def engine_step(engine: Any, step: int, rank: int, world_size: int, inject: bool = False) -> tuple[float, float]:
    x, y = local_batch(step, rank, world_size)
    loss = nn.functional.mse_loss(engine(x), y)
    value = loss.item()
    if inject:
        loss = loss * float("inf")
    lr = engine.get_lr()[0]
    engine.backward(loss)
    engine.step()
    return value, lr


def ddp_step(ref: nn.Module, ref_opt: torch.optim.Optimizer, step: int, rank: int, world_size: int, *,
             lr: float, clip: float | None, inject: bool = False) -> float | None:
    """One DDP step with the engine's LR; returns the pre-clip norm (None if no clipping)."""
    x, y = local_batch(step, rank, world_size)
    ref_opt.zero_grad()
    loss = nn.functional.mse_loss(ref(x), y)
    (loss * float("inf") if inject else loss).backward()
    norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), clip).item() if clip else None
    if norm is None or math.isfinite(norm):  # like the engine: skip the step on overflow
        for group in ref_opt.param_groups:
            group["lr"] = lr
        ref_opt.step()
    return norm


def run_sharded(rank: int, world_size: int, out: Path, ckpt: Path, precisions: frozenset[str]) -> dict:
    model = make_net()
    ref = DistributedDataParallel(copy.deepcopy(model))
    ref_opt = torch.optim.Adam(ref.parameters(), lr=LR, betas=BETAS, weight_decay=WD, fused=True)
    engine, opt, _, scheduler = sfa_ds.initialize(model=model, model_parameters=model.parameters(),
                                                  config=sharded_config(world_size))
    res: dict[str, Any] = {
        "optimizer_type": type(opt).__name__, "is_sharded": isinstance(opt, ShardedFusedAdam),
        "engine_optimizer_is_opt": engine.optimizer is opt,
        "enable_backward_allreduce": engine.enable_backward_allreduce,
        "engine_gradient_clipping": engine.gradient_clipping(), "max_grad_norm": opt.max_grad_norm,
        "steps": [], "eval_before": eval_loss(engine.module),
    }
    for step in range(STEPS):
        inject = step == INJECT_AT and rank == 1
        calls: list = []
        with counting_collectives(calls):
            loss, lr = engine_step(engine, step, rank, world_size, inject=inject)
        ref_norm = ddp_step(ref, ref_opt, step, rank, world_size, lr=lr, clip=CLIP, inject=inject)
        res["steps"].append({
            "loss": loss, "lr": lr, "diff": max_diff(engine.module, ref.module), "overflow": opt.overflow,
            "applied": engine.was_step_applied(), "skipped_steps": engine.skipped_steps,
            "scheduler_iteration": scheduler.last_batch_iteration, "grad_norm": engine.get_global_grad_norm(),
            "ref_norm": ref_norm, "loss_scale": opt.loss_scale,
            "collectives": calls, "opt_comm_bytes": dict(opt.last_step_comm_bytes),
        })
        if step + 1 == SAVE_AT:
            engine.save_checkpoint(str(ckpt), tag="mid")
    res["eval_after"] = eval_loss(engine.module)
    if rank == 0:
        torch.save({n: p.detach().clone() for n, p in engine.module.named_parameters()}, out / "uninterrupted.pt")
    # Control: with the engine's own all-reduce switched back on, gradients travel twice more.
    engine.enable_backward_allreduce = True
    calls = []
    with counting_collectives(calls):
        engine_step(engine, STEPS, rank, world_size)
    res["control_collectives"] = calls
    res["param_numel"] = sum(p.numel() for p in model.parameters())
    res["bucket_padded_numel"] = sum(b.layout.padded_numel for b in opt.shard_state().buckets)
    res["accumulation"] = run_accumulation(rank, world_size)
    res["fp16_model"] = run_fp16_model(rank, world_size)
    res["precision_sections"] = {name: run_precision_section(rank, world_size, name)
                                 for name in ("bf16", "fp16") if name in precisions}
    return res


def run_accumulation(rank: int, world_size: int) -> dict:
    """gradient_accumulation_steps=2, the first micro-batch under engine.no_sync(), vs DDP doing the same."""
    config = {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // world_size, "gradient_accumulation_steps": 2,
              "steps_per_print": 10**6, "zero_optimization": {"stage": 0}, "gradient_clipping": 0.0,
              "optimizer": {"type": "ShardedFusedAdam", "params": {"lr": LR, "betas": list(BETAS)}}}
    model = make_net()
    ref = DistributedDataParallel(copy.deepcopy(model))
    ref_opt = torch.optim.Adam(ref.parameters(), lr=LR, betas=BETAS, fused=True)
    engine, opt, _, _ = sfa_ds.initialize(model=model, config=config)
    diffs, no_sync_reductions = [], 0
    for step in range(3):
        for micro in range(2):
            x, y = local_batch(2 * step + micro, rank, world_size)
            calls: list = []
            with counting_collectives(calls), (engine.no_sync() if micro == 0 else contextlib.nullcontext()):
                engine.backward(nn.functional.mse_loss(engine(x), y))
            if micro == 0:
                no_sync_reductions += _numel(calls)
                engine.step()  # not a boundary: only counts the micro-step
            with ref.no_sync() if micro == 0 else contextlib.nullcontext():
                (nn.functional.mse_loss(ref(x), y) / 2).backward()
        engine.step()
        ref_opt.step()
        ref_opt.zero_grad()
        diffs.append(max_diff(engine.module, ref.module))
    return {"diffs": diffs, "no_sync_reduced_numel": no_sync_reductions, "global_steps": engine.global_steps}


def _numel(calls: list) -> int:
    return sum(numel for _, numel in calls)


def run_fp16_model(rank: int, world_size: int) -> dict:
    """What the fp16-section error recommends: a half model and "loss_scale": "dynamic", compared
    with the same ShardedFusedAdam in a hand-written loop (no DeepSpeed). The config leaves
    gradient_clipping at DeepSpeed's default, 1.0, which becomes max_grad_norm=1.0."""
    config = {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // world_size, "steps_per_print": 10**6,
              "optimizer": {"type": "ShardedFusedAdam", "params": {"lr": LR, "loss_scale": "dynamic"}}}
    model, hand_model = make_net().half(), make_net().half()
    engine, opt, _, _ = sfa_ds.initialize(model=model, config=config)
    hand_opt = ShardedFusedAdam(hand_model.parameters(), lr=LR, loss_scale="dynamic", max_grad_norm=1.0)
    before = eval_loss(lambda x: model(x.half()).float())
    diffs, scales = [], []
    for step in range(4):
        x, y = local_batch(step, rank, world_size)
        engine.backward(nn.functional.mse_loss(engine(x.half()).float(), y))
        engine.step()
        hand_opt.backward(nn.functional.mse_loss(hand_model(x.half()).float(), y))
        hand_opt.step()
        hand_opt.zero_grad()
        diffs.append(max_diff(engine.module, hand_model))
        scales.append((opt.loss_scale, hand_opt.loss_scale))
    return {"diffs": diffs, "scales": scales, "dtype": str(next(model.parameters()).dtype),
            "has_masters": "master_param" in opt.state_dict()["state"][0],
            "eval": [before, eval_loss(lambda x: model(x.half()).float())]}


PRECISION_SECTIONS = {
    "bf16": ({"enabled": True}, torch.bfloat16, None),
    "fp16": ({"enabled": True, "loss_scale": 0, "initial_scale_power": 8, "loss_scale_window": 3,
              "hysteresis": 2, "min_loss_scale": 1}, torch.float16,
             {"init_scale": 2.0**8, "growth_interval": 3, "hysteresis": 2, "min_scale": 1.0}),
}


def run_precision_section(rank: int, world_size: int, name: str) -> dict:
    """A real-world config with an fp16/bf16 section, through register() alone and plain
    deepspeed.initialize (the engine wires itself), against ShardedFusedAdam on a model cast by
    hand with the loss scaler the section describes."""
    section, dtype, scaler = PRECISION_SECTIONS[name]
    import deepspeed

    from sharded_fused_adam import DynamicLossScaler

    config = sfa_ds.register({"train_micro_batch_size_per_gpu": GLOBAL_BATCH // world_size, "steps_per_print": 10**6,
                              "optimizer": {"type": "ShardedFusedAdamW", "params": {"lr": LR, "betas": "auto"}},
                              name: section, "gradient_clipping": CLIP})
    config["optimizer"]["params"]["betas"] = list(BETAS)  # what the Trainer does with "auto"
    model, hand_model = make_net(), make_net().to(dtype)
    engine, opt, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    hand_opt = ShardedFusedAdam(hand_model.parameters(), lr=LR, betas=BETAS, weight_decay=1e-2, adamw=True,
                                max_grad_norm=CLIP, loss_scale=DynamicLossScaler(**scaler) if scaler else None)
    before = eval_loss(lambda x: engine.module(x.to(dtype)).float())
    diffs, scales, norms = [], [], []
    for step in range(6):
        x, y = local_batch(step, rank, world_size)
        engine.backward(nn.functional.mse_loss(engine(x.to(dtype)).float(), y))
        engine.step()
        hand_opt.backward(nn.functional.mse_loss(hand_model(x.to(dtype)).float(), y))
        hand_opt.step()
        hand_opt.zero_grad()
        diffs.append(max_diff(engine.module, hand_model))
        scales.append((opt.loss_scale, hand_opt.loss_scale))
        norms.append((engine.get_global_grad_norm(), hand_opt.get_global_grad_norm()))
    return {"optimizer": type(engine.optimizer).__name__, "unwrapped": engine.optimizer is engine.basic_optimizer,
            "dtype": str(next(engine.module.parameters()).dtype), "allreduce": engine.enable_backward_allreduce,
            "diffs": diffs, "scales": scales, "norms": norms, "max_grad_norm": opt.max_grad_norm,
            "has_masters": "master_param" in opt.state_dict()["state"][0],
            "eval": [before, eval_loss(lambda x: engine.module(x.to(dtype)).float())]}


def run_resume(rank: int, world_size: int, out: Path, ckpt: Path, precisions: frozenset[str]) -> dict:
    model = make_net()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-3.0)  # nothing of this start may survive the load
    engine, opt, _, scheduler = sfa_ds.initialize(model=model, model_parameters=model.parameters(),
                                                  config=sharded_config(world_size))
    engine.load_checkpoint(str(ckpt), tag="mid")
    saved = torch.load(ckpt / "mid" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    state = opt.state_dict()  # a collective, on every rank
    res: dict[str, Any] = {
        "module_equal": all(torch.equal(p, saved["module"][n]) for n, p in engine.module.named_parameters()),
        "state_keys_equal": state["state"].keys() == saved["optimizer"]["state"].keys(),
        "state_equal": all(torch.equal(v, saved["optimizer"]["state"][i][k])
                           for i, entry in state["state"].items() for k, v in entry.items()),
        "lr_equal": state["param_groups"][0]["lr"] == saved["optimizer"]["param_groups"][0]["lr"],
        "loss_scaler_equal": state["sharded_fused_adam"]["loss_scaler"]
        == saved["optimizer"]["sharded_fused_adam"]["loss_scaler"],
        "saved_world_size": saved["optimizer"]["sharded_fused_adam"]["world_size"],
        "scheduler_equal": scheduler.state_dict() == saved["lr_scheduler"],
        "global_steps": engine.global_steps, "skipped_steps": engine.skipped_steps,
    }
    for step in range(SAVE_AT, STEPS):
        engine_step(engine, step, rank, world_size)
    final = torch.load(out / "uninterrupted.pt", weights_only=True)
    res["final_diff"] = max((p.detach() - final[n]).abs().max().item() for n, p in engine.module.named_parameters())
    return res


def delegated_config(world_size: int, stage: int, optimizer: dict, clip: float = 0.0) -> dict[str, Any]:
    return {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // world_size, "steps_per_print": 10**6,
            "gradient_accumulation_steps": 1, "gradient_clipping": clip,
            "optimizer": optimizer, "zero_optimization": {"stage": stage}}


def train_pair(rank: int, world_size: int, config: dict, ref_cls: type, *, clip: float = 0.0,
               steps: int = 6, ref_kwargs: dict | None = None) -> tuple[list[float], list[float], Any]:
    """Train an engine built by sfa_ds.initialize next to DDP + ``ref_cls``; returns the
    held-out loss before and after, the max param difference after each step, the engine."""
    model = make_net()
    ref = DistributedDataParallel(copy.deepcopy(model))
    ref_opt = ref_cls(ref.parameters(), **(ref_kwargs or {}))
    engine, *_ = sfa_ds.initialize(model=model, model_parameters=model.parameters(), config=config)
    losses, diffs = [eval_loss(engine.module)], []
    for step in range(steps):
        engine_step(engine, step, rank, world_size)
        ddp_step(ref, ref_opt, step, rank, world_size, lr=engine.get_lr()[0], clip=clip)
        diffs.append(max_diff(engine.module, ref.module))
    losses.append(eval_loss(engine.module))
    return losses, diffs, engine


def run_delegated(rank: int, world_size: int, out: Path, ckpt: Path, precisions: frozenset[str]) -> dict:
    import deepspeed

    res: dict[str, Any] = {}
    adam = {"lr": LR, "betas": list(BETAS), "weight_decay": WD, "eps": 1e-8}
    fused_ref = dict(lr=LR, betas=BETAS, weight_decay=WD, fused=True)
    # Stage 2, Adam (L2 decay), default kernel, vs DDP + torch.optim.Adam(fused=True).
    cfg = delegated_config(world_size, 2, {"type": "ShardedFusedAdam", "params": adam})
    losses, diffs, engine = train_pair(rank, world_size, cfg, torch.optim.Adam, ref_kwargs=fused_ref)
    res["z2_adam"] = {"losses": losses, "diffs": diffs, "basic": type(engine.basic_optimizer).__name__,
                      "wrapper": type(engine.optimizer).__name__,
                      "state_keys": sorted(next(iter(engine.basic_optimizer.state.values())).keys())}
    # Stage 1, ShardedFusedAdamW with DeepSpeed's own clipping, vs DDP + clip + AdamW(fused=True).
    cfg = delegated_config(world_size, 1, {"type": "ShardedFusedAdamW", "params": adam}, clip=CLIP)
    losses, diffs, engine = train_pair(rank, world_size, cfg, torch.optim.AdamW, clip=CLIP, ref_kwargs=fused_ref)
    res["z1_adamw_clipped"] = {"losses": losses, "diffs": diffs, "basic": type(engine.basic_optimizer).__name__,
                               "adamw": engine.basic_optimizer.param_groups[0]["decoupled_weight_decay"]}
    # Stage 2 vs DeepSpeed's own Adam on the same gradients: "torch_adam" gives torch.optim.Adam
    # (single-tensor on CPU), matched by our reference kernel; with "fused": true (passed through
    # to torch), matched by our default kernel.
    ds_adam = {**adam, "torch_adam": True, "adam_w_mode": False}
    pairs = {"reference_vs_torch_adam": ({**adam, "kernel": "reference"}, ds_adam),
             "torch_fused_vs_torch_adam_fused": (adam, {**ds_adam, "fused": True})}
    for label, (ours_params, theirs_params) in pairs.items():
        ours_cfg = delegated_config(world_size, 2, {"type": "ShardedFusedAdam", "params": ours_params})
        ours = sfa_ds.initialize(model=make_net(), config=ours_cfg)[0]
        theirs_cfg = delegated_config(world_size, 2, {"type": "Adam", "params": theirs_params})
        theirs = deepspeed.initialize(model=make_net(), config=theirs_cfg)[0]
        diffs = []
        for step in range(6):
            engine_step(ours, step, rank, world_size)
            engine_step(theirs, step, rank, world_size)
            diffs.append(max_diff(ours.module, theirs.module))
        res[label] = {"diffs": diffs, "theirs": type(theirs.basic_optimizer).__name__,
                      "theirs_fused": theirs.basic_optimizer.param_groups[0].get("fused")}
    if "bf16" in precisions:
        res["z2_bf16"] = run_delegated_bf16(rank, world_size)
    # Stage 2 checkpoint round trip: a fresh engine continues exactly where this one is.
    ours.save_checkpoint(str(ckpt), tag="z2")
    fresh = sfa_ds.initialize(model=Net(), config=ours_cfg)[0]
    fresh.load_checkpoint(str(ckpt), tag="z2")
    engine_step(ours, 6, rank, world_size)
    engine_step(fresh, 6, rank, world_size)
    res["z2_checkpoint_diff"] = max_diff(ours.module, fresh.module)
    return res


def run_delegated_bf16(rank: int, world_size: int) -> dict:
    """Stage 2 with DeepSpeed's bf16: FusedAdam steps DeepSpeed's fp32 partitions of a bf16 model."""
    adam = {"lr": LR, "betas": list(BETAS), "weight_decay": WD, "eps": 1e-8}
    cfg = {**delegated_config(world_size, 2, {"type": "ShardedFusedAdam", "params": adam}), "bf16": {"enabled": True}}
    bf16 = sfa_ds.initialize(model=make_net(), config=cfg)[0]
    before = eval_loss(lambda x: bf16(x.bfloat16()).float())
    for step in range(6):
        x, y = local_batch(step, rank, world_size)
        bf16.backward(nn.functional.mse_loss(bf16(x.bfloat16()).float(), y))
        bf16.step()
    state = next(iter(bf16.basic_optimizer.state.values()))
    return {"basic": type(bf16.basic_optimizer).__name__, "model_dtype": str(bf16.module.fc1.weight.dtype),
            "state_dtype": str(state["exp_avg"].dtype), "eval": [before, eval_loss(lambda x: bf16(x.bfloat16()).float())]}


SCENARIOS = {"sharded": run_sharded, "resume": run_resume, "delegated": run_delegated}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--precisions", default="bf16,fp16", help="comma-separated DeepSpeed sections to run")
    args, _ = parser.parse_known_args()  # the deepspeed launcher appends --local_rank
    torch.set_num_threads(1)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")  # before the DDP reference is built
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    precisions = frozenset(filter(None, args.precisions.split(",")))
    res = SCENARIOS[args.scenario](rank, world_size, args.out, args.ckpt, precisions)
    res.update(rank=rank, world_size=world_size)
    name = f"{args.scenario}_w{world_size}_rank{rank}.json"
    tmp = args.out / f".{name}.tmp"
    tmp.write_text(json.dumps(res))
    tmp.rename(args.out / name)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

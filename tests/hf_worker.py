"""One rank of a Hugging Face job (started by torchrun from tests/test_hf_integrations.py).

Trains a 2-layer GPT-2 built from its config (no downloads) through the real packages, each path
next to the same path with its reference optimizer, and writes what it measured to
``<out>/<scenario>_rank<r>.json`` (the parent asserts). Scenarios:

* ``plain``: (1) an Accelerate loop (``prepare``, ``accumulate``, ``backward``, ``clip_grad_norm_``,
  ``step``, ``zero_grad``) with ShardedFusedAdamW vs torch.optim.AdamW(fused=True); (2) the
  Trainer with ``sfa_hf.Trainer`` vs the stock Trainer with ``optim="adamw_torch_fused"``,
  ``max_grad_norm=1.0``, a checkpoint at step 10, then a resume from it.
* ``deepspeed``: the stock Trainer with ``TrainingArguments(deepspeed=sfa_ds.register(cfg))`` for
  ZeRO stage 0 and stage 2, vs DeepSpeed's own AdamW on the same config,
  and a resume of the stage-0 run.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import sys  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "hf"))
from common import SEQ, VOCAB, Tokens  # noqa: E402  (the examples' synthetic data set)

STEPS, SAVE_AT = 20, 10


def make_model() -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=SEQ,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone().float() for n, p in model.named_parameters()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[n] - b[n]).abs().max().item() for n in a)


def bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[n], b[n]) for n in a)


# ---- Accelerate ----------------------------------------------------------------------------
def accelerate_loop(kind: str) -> tuple[dict, list[float]]:
    from accelerate import Accelerator

    from sharded_fused_adam import ShardedFusedAdamW
    from sharded_fused_adam.integrations import accelerate as sfa_acc

    accelerator = Accelerator(gradient_accumulation_steps=2, cpu=True)
    assert accelerator.num_processes == int(os.environ["WORLD_SIZE"]), accelerator.num_processes
    model = make_model()
    if kind == "make_optimizer":
        opt = sfa_acc.make_optimizer(accelerator, model.parameters(), lr=3e-3, weight_decay=0.1)
    elif kind == "plain":
        opt = ShardedFusedAdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, fused=True)
    loader = torch.utils.data.DataLoader(Tokens(), batch_size=2, shuffle=False)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    norms = []
    for i, batch in zip(range(2 * STEPS), loader):
        with accelerator.accumulate(model):
            accelerator.backward(model(**batch).loss)
            if accelerator.sync_gradients:
                norms.append(accelerator.clip_grad_norm_(model.parameters(), 0.5).item())
            opt.step()
            opt.zero_grad()
    params = params_of(accelerator.unwrap_model(model))
    accelerator.free_memory()
    return params, norms


# ---- Trainer -------------------------------------------------------------------------------
def training_args(out: Path, **overrides: Any) -> transformers.TrainingArguments:
    kwargs = dict(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=2, learning_rate=3e-3,
                  weight_decay=0.1, max_grad_norm=1.0, logging_steps=1, save_strategy="steps", save_steps=SAVE_AT,
                  report_to="none", seed=0, lr_scheduler_type="linear", warmup_steps=2,
                  disable_tqdm=True, use_cpu="deepspeed" not in overrides)
    kwargs.update(overrides)
    args = transformers.TrainingArguments(**kwargs)
    if "deepspeed" in overrides:
        from sharded_fused_adam.integrations import transformers as sfa_hf

        sfa_hf.repair_cpu_deepspeed_args(args)  # CPU machines only: see its docstring
    assert args.world_size == int(os.environ["WORLD_SIZE"]), args.world_size
    return args


def make_lora_model() -> Any:
    """The same GPT-2 with PEFT LoRA adapters on its attention (only they train)."""
    import peft

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0, fan_in_fan_out=True)
    return peft.get_peft_model(make_model(), config)


def train(trainer_cls: type, args: transformers.TrainingArguments, resume: str | None = None,
          make: Any = None) -> dict:
    model = (make or make_model)()
    trainer = trainer_cls(model=model, args=args, train_dataset=Tokens())
    trainer.train(resume_from_checkpoint=resume)
    logs = [e for e in trainer.state.log_history if "loss" in e]
    return {"params": params_of(trainer.model), "grad_norms": [e.get("grad_norm") for e in logs],
            "losses": [e["loss"] for e in logs], "optimizer": type(trainer.optimizer.optimizer
                                                                   if hasattr(trainer.optimizer, "optimizer")
                                                                   else trainer.optimizer).__name__}


def stock_trainer(cls: type) -> Any:
    """The stock Trainer given ``optimizers=(cls(model.parameters(), ...), None)``."""
    def build(model: Any, args: Any, train_dataset: Any) -> transformers.Trainer:
        from sharded_fused_adam.integrations import transformers as sfa_hf

        extra = {"fused": True} if cls is torch.optim.AdamW else {}
        opt = cls(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay, **extra)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=train_dataset, optimizers=(opt, None))
        if cls is not torch.optim.AdamW:
            trainer.add_callback(sfa_hf.ShardedFusedAdamCallback())
        return trainer
    return build


def compare(ours: dict, ref: dict) -> dict:
    return {"param_diff": max_diff(ours["params"], ref["params"]),
            # DeepSpeed's own torch AdamW at stage 0 reports no norm (None): nothing to compare then
            "norm_diff": None if None in ref["grad_norms"] else
            max(abs(a - b) for a, b in zip(ours["grad_norms"], ref["grad_norms"])),
            "num_norms": [len(ours["grad_norms"]), len(ref["grad_norms"])],
            "losses": [ours["losses"][0], ours["losses"][-1], ref["losses"][-1]],
            "min_norm": min(n or 0.0 for n in ours["grad_norms"]), "optimizers": [ours["optimizer"], ref["optimizer"]]}


def run_plain(rank: int, out: Path) -> dict:
    from sharded_fused_adam.integrations import transformers as sfa_hf

    from sharded_fused_adam import ShardedFusedAdam, ShardedFusedAdamW

    ref_p, ref_n = accelerate_loop("torch")
    res: dict[str, Any] = {}
    # "plain" (ShardedFusedAdamW built as for a hand-written loop) needs the optimizer to detect
    # DDP by itself and snapshot_state_dict(); run it where the optimizer has them.
    idioms = hasattr(ShardedFusedAdam, "snapshot_state_dict")
    for kind in ("make_optimizer", "plain") if idioms else ("make_optimizer",):
        ours_p, ours_n = accelerate_loop(kind)
        res[f"accelerate_{kind}"] = {"param_diff": max_diff(ours_p, ref_p), "num_norms": len(ours_n),
                                     "norm_diff": max(abs(a - b) for a, b in zip(ours_n, ref_n)),
                                     "min_norm": min(ours_n)}
    ref = train(transformers.Trainer, training_args(out / "ref", optim="adamw_torch_fused"))
    ours = train(sfa_hf.Trainer, training_args(out / "ours"))
    resumed = train(sfa_hf.Trainer, training_args(out / "ours"), resume=str(out / "ours" / f"checkpoint-{SAVE_AT}"))
    res["trainer"] = compare(ours, ref)
    res["trainer"]["resume_bitwise"] = bitwise(resumed["params"], ours["params"])
    res["trainer"]["resume_norms_equal"] = resumed["grad_norms"] == ours["grad_norms"]
    if idioms:  # the stock Trainer with an optimizer handed in, and the callback
        # (no resume here: the Trainer loads the checkpoint's weights into new tensors after this
        # optimizer packed the params, which it reports as a ParamMovedError; sfa_hf.Trainer
        # builds its optimizer after loading)
        stock_run = train(stock_trainer(ShardedFusedAdamW), training_args(out / "stock"))
        res["stock_trainer"] = compare(stock_run, train(stock_trainer(torch.optim.AdamW), training_args(out / "sref")))
        res["stock_trainer"]["saved"] = (out / "stock" / f"checkpoint-{SAVE_AT}" / "optimizer.pt").is_file()
    return res


# ---- DeepSpeed -----------------------------------------------------------------------------
def ds_config(type_: str, stage: int, **sections: Any) -> dict:
    params = {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}
    if type_ == "AdamW":
        params["torch_adam"] = True
        params["fused"] = True
    return {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "steps_per_print": 10**6,
            "optimizer": {"type": type_, "params": params}, "zero_optimization": {"stage": stage}, **sections}


def run_deepspeed(rank: int, out: Path) -> dict:
    from sharded_fused_adam.integrations import deepspeed as sfa_ds

    res: dict[str, Any] = {}
    # bf16/fp16 sections through the Trainer need TrainingArguments(bf16=True), which the Trainer
    # refuses on CPU without use_cpu (and use_cpu switches DeepSpeed off): those sections are
    # tested through deepspeed.initialize in tests/test_deepspeed.py.
    cases = {"stage0": (0, {}), "stage2": (2, {})}
    for name, (stage, sections) in cases.items():
        bf16 = "bf16" in sections
        ours_dir, ref_dir = out / f"{name}_ours", out / f"{name}_ref"
        ours = train(transformers.Trainer, training_args(
            ours_dir, bf16=bf16, deepspeed=sfa_ds.register(ds_config("ShardedFusedAdamW", stage, **sections))))
        ref = train(transformers.Trainer, training_args(ref_dir, bf16=bf16,
                                                        deepspeed=ds_config("AdamW", stage, **sections)))
        res[name] = compare(ours, ref)
        if name == "stage0":
            resumed = train(transformers.Trainer, training_args(
                ours_dir, deepspeed=sfa_ds.register(ds_config("ShardedFusedAdamW", 0))),
                resume=str(ours_dir / f"checkpoint-{SAVE_AT}"))
            res[name]["resume_bitwise"] = bitwise(resumed["params"], ours["params"])
    return res


def run_resume_other_world_size(rank: int, out: Path) -> dict:
    """One rank resumes the 2-rank ``plain`` run's Trainer checkpoint and trains on."""
    from sharded_fused_adam.integrations import transformers as sfa_hf

    checkpoint = out / "ours" / f"checkpoint-{SAVE_AT}"
    saved = torch.load(checkpoint / transformers.trainer.OPTIMIZER_NAME, weights_only=True)
    loaded: dict[str, Any] = {}

    class Capture(transformers.TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
            loaded.update(sfa_hf.sharded_optimizer(optimizer).state_dict())  # right after the Trainer loaded it

    trainer = sfa_hf.Trainer(model=make_model(), args=training_args(out / "resume1", max_steps=SAVE_AT + 2),
                             train_dataset=Tokens(), callbacks=[Capture()])
    trainer.train(resume_from_checkpoint=str(checkpoint))
    same = sorted(loaded["state"]) == sorted(saved["state"]) and all(
        torch.equal(loaded["state"][i][k], v) for i, entry in saved["state"].items() for k, v in entry.items())
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {"state_equal": same, "num_params_with_state": len(saved["state"]), "losses": losses,
            "global_step": trainer.state.global_step}


# ---- each framework's own save, then a new launch that resumes ----------------------------
def accelerate_saving(kind: str, out: Path, resume: bool) -> dict[str, torch.Tensor]:
    """An Accelerate loop with a plain ``ShardedFusedAdamW`` (or torch's fused AdamW) and nothing
    else: ``save_state`` at step 10 (safetensors, the default); with ``resume``, a new launch that
    ``load_state``s it and trains on to step 20."""
    from accelerate import Accelerator

    from sharded_fused_adam import ShardedFusedAdamW

    accelerator = Accelerator(gradient_accumulation_steps=2, cpu=True)
    model = make_model()
    cls = ShardedFusedAdamW if kind == "ours" else torch.optim.AdamW
    opt = cls(model.parameters(), lr=3e-3, weight_decay=0.1, **({} if kind == "ours" else {"fused": True}))
    loader = torch.utils.data.DataLoader(Tokens(), batch_size=2, shuffle=False)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    state_dir = out / f"accelerate_{kind}" / "state"
    if resume:
        accelerator.load_state(str(state_dir))
    for i, batch in zip(range(2 * STEPS), loader):
        if resume and i < 2 * SAVE_AT:
            continue  # the batches the saved run consumed
        if i == 2 * SAVE_AT and not resume:
            accelerator.save_state(str(state_dir))
        with accelerator.accumulate(model):
            accelerator.backward(model(**batch).loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
            opt.zero_grad()
    params = params_of(accelerator.unwrap_model(model))
    accelerator.free_memory()
    return params


def stock_trainer_no_glue(cls: type) -> Any:
    """The stock Trainer with ``optimizers=(cls(model.parameters(), ...), None)`` and nothing else."""
    def build(model: Any, args: Any, train_dataset: Any) -> transformers.Trainer:
        extra = {"fused": True} if cls is torch.optim.AdamW else {}
        opt = cls(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay, **extra)
        return transformers.Trainer(model=model, args=args, train_dataset=train_dataset, optimizers=(opt, None))
    return build


def run_save_paths(rank: int, out: Path) -> dict:
    """Launch 1: each path trains 20 steps and saves at step 10 by its framework's own means."""
    import safetensors.torch as st

    from sharded_fused_adam import ShardedFusedAdamW

    res: dict[str, Any] = {}
    ours, ref = accelerate_saving("ours", out, False), accelerate_saving("torch", out, False)
    saved = st.load_file(str(out / "accelerate_ours" / "state" / "model.safetensors"))
    res["accelerate"] = {"param_diff": max_diff(ours, ref), "saved_keys": len(saved), "num_params": len(ours)}
    torch.save(ours, out / f"accelerate_final_rank{rank}.pt")
    stock = train(stock_trainer_no_glue(ShardedFusedAdamW), training_args(out / "stock_noglue"))
    stock_ref = train(stock_trainer_no_glue(torch.optim.AdamW), training_args(out / "stock_noglue_ref"))
    res["stock_trainer"] = compare(stock, stock_ref)
    torch.save(stock["params"], out / f"stock_final_rank{rank}.pt")
    checkpoint = out / "stock_noglue" / f"checkpoint-{SAVE_AT}"
    res["stock_trainer"]["files"] = sorted(f.name for f in checkpoint.iterdir())
    lora = train(stock_trainer_no_glue(ShardedFusedAdamW), training_args(out / "lora"), make=make_lora_model)
    lora_ref = train(stock_trainer_no_glue(torch.optim.AdamW), training_args(out / "lora_ref"), make=make_lora_model)
    res["lora"] = compare(lora, lora_ref)
    saved_state = torch.load(out / "lora" / f"checkpoint-{SAVE_AT}" / "optimizer.pt", weights_only=True)["state"]
    res["lora"]["num_params_with_state"] = len(saved_state)
    torch.save(lora["params"], out / f"lora_final_rank{rank}.pt")
    return res


def run_resume_paths(rank: int, out: Path) -> dict:
    """Launch 2: resume each path from launch 1's checkpoint; it must end where launch 1 ended."""
    from sharded_fused_adam import ShardedFusedAdamW

    final = torch.load(out / f"accelerate_final_rank{rank}.pt", weights_only=True)
    resumed = accelerate_saving("ours", out, True)
    res: dict[str, Any] = {"accelerate": {"resume_bitwise": bitwise(resumed, final)}}
    final = torch.load(out / f"stock_final_rank{rank}.pt", weights_only=True)
    stock = train(stock_trainer_no_glue(ShardedFusedAdamW), training_args(out / "stock_noglue"),
                  resume=str(out / "stock_noglue" / f"checkpoint-{SAVE_AT}"))
    res["stock_trainer"] = {"resume_bitwise": bitwise(stock["params"], final)}
    final = torch.load(out / f"lora_final_rank{rank}.pt", weights_only=True)
    lora = train(stock_trainer_no_glue(ShardedFusedAdamW), training_args(out / "lora"),
                 resume=str(out / "lora" / f"checkpoint-{SAVE_AT}"), make=make_lora_model)
    res["lora"] = {"resume_bitwise": bitwise(lora["params"], final)}
    return res


SCENARIOS = {"plain": run_plain, "deepspeed": run_deepspeed, "resume_other": run_resume_other_world_size,
             "save_paths": run_save_paths, "resume_paths": run_resume_paths}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--out", type=Path, required=True)
    args, _ = parser.parse_known_args()
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    res = SCENARIOS[args.scenario](rank, args.out)
    res["rank"] = rank
    res["world_size"] = int(os.environ["WORLD_SIZE"])
    name = f"{args.scenario}_rank{rank}.json"
    tmp = args.out / f".{name}.tmp"
    tmp.write_text(json.dumps(res))
    tmp.rename(args.out / name)


if __name__ == "__main__":
    main()

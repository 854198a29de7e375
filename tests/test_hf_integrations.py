"""Hugging Face Trainer, Accelerate and the Trainer with DeepSpeed configs, through the real packages.

Two torchrun jobs of 2 gloo ranks run ``tests/hf_worker.py`` (each path trains 20 steps next to
the same path with its reference optimizer, then resumes from the checkpoint saved at step 10)
and the examples run for a few steps. Results are read from the files each rank wrote. About
100 s in all here (transformers and DeepSpeed imports dominate). Tolerances: params within 1e-5
and logged grad norms within 1e-5 of the reference (measured: 0.0 for Accelerate, the Trainer
and DeepSpeed stage 2; 7.6e-6 for DeepSpeed stage 0 against DeepSpeed's own torch AdamW, whose
clipping coefficient comes from a global norm summed in another order).
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from sharded_fused_adam import ShardedFusedAdam
from test_deepspeed import _torchrun  # the same clean environment and launcher

pytestmark = pytest.mark.skipif(any(importlib.util.find_spec(m) is None
                                    for m in ("transformers", "accelerate", "peft", "deepspeed")),
                                reason="transformers/accelerate/peft/deepspeed not installed "
                                       "(pip install -e '.[hf,deepspeed]')")

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "hf_worker.py"
EXAMPLES = REPO / "examples" / "hf"
TOL = 1e-5
# The stock Trainer / a plain ShardedFusedAdamW in an Accelerate loop rely on the optimizer
# detecting DDP and on snapshot_state_dict() (the gradient-lifetime work); checked where present.
IDIOMS = hasattr(ShardedFusedAdam, "snapshot_state_dict")


os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the launched ranks inherit it: nothing is downloaded


def _job(scenario: str, out: Path, world_size: int = 2) -> list[dict]:
    output = _torchrun(world_size, str(WORKER), scenario, "--out", str(out))
    files = [out / f"{scenario}_rank{r}.json" for r in range(world_size)]
    missing = [f.name for f in files if not f.exists()]
    assert not missing, f"no result from {missing}:\n{output[-8000:]}"
    return [json.loads(f.read_text()) for f in files]


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf_plain")


@pytest.fixture(scope="module")
def plain(plain_dir) -> list[dict]:
    return _job("plain", plain_dir)


@pytest.fixture(scope="module")
def with_deepspeed(tmp_path_factory) -> list[dict]:
    return _job("deepspeed", tmp_path_factory.mktemp("hf_ds"))


def _check_pair(res: dict, norms: bool = True) -> None:
    assert res["num_norms"] in ([20, 20], 20), res
    assert res["param_diff"] <= TOL, res
    if norms:
        assert res["norm_diff"] <= TOL and res["min_norm"] > 0, res


def test_accelerate_loop_matches_torch_adamw(plain):
    for r in plain:
        assert r["world_size"] == 2
        _check_pair(r["accelerate_make_optimizer"])


@pytest.mark.skipif(not IDIOMS, reason="needs the optimizer to detect DDP by itself (gradient-lifetime work)")
def test_accelerate_loop_with_a_plain_optimizer(plain):
    for r in plain:
        _check_pair(r["accelerate_plain"])


def test_trainer_matches_torch_adamw_and_resumes_bitwise(plain):
    for r in plain:
        res = r["trainer"]
        assert res["optimizers"] == ["ShardedFusedAdamW", "AdamW"]
        _check_pair(res)
        assert res["losses"][1] < res["losses"][0] - 0.2, res["losses"]
        assert res["resume_bitwise"] and res["resume_norms_equal"], res


def test_trainer_checkpoint_resumes_at_another_world_size(plain, plain_dir):
    """The 2-rank Trainer's checkpoint, resumed by one rank: the optimizer state it loads is the
    saved one, bit for bit, and training goes on from step 10."""
    (res,) = _job("resume_other", plain_dir, world_size=1)
    assert res["world_size"] == 1 and res["num_params_with_state"] > 0
    assert res["state_equal"], res
    # the log history comes back with the checkpoint: 10 saved entries, then the 2 new steps
    assert res["global_step"] == 12 and len(res["losses"]) == 12 and all(l == l for l in res["losses"]), res


@pytest.mark.skipif(not IDIOMS, reason="needs snapshot_state_dict() and DDP detection (gradient-lifetime work)")
def test_stock_trainer_with_our_optimizer_and_callback(plain):
    for r in plain:
        _check_pair(r["stock_trainer"])
        assert r["stock_trainer"]["saved"]  # the rank-0 save did not deadlock


@pytest.fixture(scope="module")
def saved_then_resumed(tmp_path_factory) -> tuple[list[dict], list[dict]]:
    """Launch 1 saves by each framework's own means; launch 2, a new torchrun job, resumes."""
    out = tmp_path_factory.mktemp("hf_resume")
    return _job("save_paths", out), _job("resume_paths", out)


def test_accelerate_save_state_writes_the_model_and_load_state_resumes_bitwise(saved_then_resumed):
    """No glue: a plain ShardedFusedAdamW, accelerator.save_state (safetensors) at step 10, then
    load_state in a new launch on CPU (prepare's cpu:0 copies included)."""
    for saved, resumed in zip(*saved_then_resumed):
        res = saved["accelerate"]
        assert res["param_diff"] == 0.0, res  # bitwise equal to torch.optim.AdamW(fused=True)
        # every param saved (GPT-2's lm_head is tied to wte: one tensor, as for torch's optimizer)
        assert res["saved_keys"] == res["num_params"], res
        assert resumed["accelerate"]["resume_bitwise"], resumed


def test_stock_trainer_with_our_optimizer_saves_and_resumes_with_no_callback(saved_then_resumed):
    """``optimizers=(ShardedFusedAdamW(model.parameters()), None)`` and nothing else: the Trainer's
    rank-0 ``optimizer.state_dict()`` is served (see served.py); resume_from_checkpoint in a new
    launch ends bitwise where the uninterrupted run ended."""
    for saved, resumed in zip(*saved_then_resumed):
        res = saved["stock_trainer"]
        _check_pair(res)
        assert res["param_diff"] == 0.0 and "optimizer.pt" in res["files"] and "trainer_state.json" in res["files"]
        assert resumed["stock_trainer"]["resume_bitwise"], resumed


def test_peft_lora_with_the_stock_trainer_saves_and_resumes(saved_then_resumed):
    """PEFT LoRA on GPT-2 (only the adapters train), the stock Trainer and our optimizer over
    ``model.parameters()``: frozen params cost nothing and have no state; resume is bitwise."""
    for saved, resumed in zip(*saved_then_resumed):
        res = saved["lora"]
        _check_pair(res)
        assert res["param_diff"] == 0.0 and res["num_params_with_state"] == 4, res  # 2 layers x (A, B)
        assert resumed["lora"]["resume_bitwise"], resumed


@pytest.mark.skipif(importlib.util.find_spec("lightning") is None, reason="lightning not installed")
def test_lightning_ddp_saves_and_resumes_bitwise(tmp_path):
    """``configure_optimizers`` returns ``ShardedFusedAdamW(self.parameters())``, nothing else:
    Lightning's DDP, ``gradient_clip_val``, its epoch-end checkpoint, and ``fit(ckpt_path=...)``
    in a new launch, against the same module with ``torch.optim.AdamW(fused=True)``."""
    worker = str(REPO / "tests" / "lightning_worker.py")
    for phase in ("fit", "resume"):
        output = _torchrun(2, worker, phase, "--out", str(tmp_path))
        missing = [r for r in range(2) if not (tmp_path / f"{phase}_rank{r}.pt").exists()]
        assert not missing, f"no result from ranks {missing}:\n{output[-8000:]}"
    for r in range(2):
        fit = torch.load(tmp_path / f"fit_rank{r}.pt", weights_only=True)
        resumed = torch.load(tmp_path / f"resume_rank{r}.pt", weights_only=True)["ours"]
        for name, value in fit["torch"].items():
            assert torch.equal(fit["ours"][name], value), name
            assert torch.equal(resumed[name], value), name


def test_trainer_deepspeed_stage0_register_alone(with_deepspeed):
    """The stock Trainer, TrainingArguments(deepspeed=register(cfg)) with "auto" values, no callback:
    DeepSpeed's own AdamW logs no grad norm at stage 0; ours logs the global norm."""
    for r in with_deepspeed:
        res = r["stage0"]
        assert res["optimizers"] == ["DeepSpeedShardedFusedAdam", "AdamW"]
        _check_pair(res, norms=False)
        assert res["min_norm"] > 0 and res["resume_bitwise"], res


def test_trainer_deepspeed_stage2_delegated(with_deepspeed):
    for r in with_deepspeed:
        _check_pair(r["stage2"])


@pytest.mark.parametrize("example", [
    ["train_accelerate.py", "--steps", "5"],
    ["train_trainer.py", "--steps", "6"],
    ["train_trainer.py", "--steps", "6", "--deepspeed", str(EXAMPLES / "ds_config_trainer.json")],
], ids=["accelerate", "trainer", "trainer_deepspeed"])
def test_examples_run(tmp_path, example):
    extra = ["--out-dir", str(tmp_path)] if example[0] == "train_trainer.py" else []
    output = _torchrun(2, str(EXAMPLES / example[0]), *example[1:], *extra)
    line = [l for l in output.splitlines() if "world_size=2" in l]
    assert line, output[-6000:]
    assert "first_loss=" in line[0], line[0]
    if "--deepspeed" in example:
        assert "optimizer=DeepSpeedShardedFusedAdam" in line[0], line[0]

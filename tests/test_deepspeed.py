"""``"type": "ShardedFusedAdam"`` in a DeepSpeed config: config checks in-process, training
through real DeepSpeed engines (CPU accelerator, gloo) in ranks started by torchrun or the
deepspeed launcher.

Each launched job runs ``tests/deepspeed_worker.py`` (or the example), which writes one result
file per rank; the assertions read those files, so a rank that aborts at exit after writing
(DeepSpeed on CPU occasionally does: "terminate called without an active exception") still
passes. DeepSpeed compiles its shm comm op at the first ``initialize`` (~65 s here); it is
cached in ``.cache/torch_extensions``. About 100 s in all once cached.

DeepSpeed's CPU accelerator supports a ``"fp16"`` / ``"bf16"`` config section only where the CPU
does (fp16 needs avx512_fp16 or AMX-FP16): ``half_sections`` asks it once, the jobs run only the
supported sections, and the tests of the others skip with the reason (``-rs`` prints it).
"""
from __future__ import annotations

import importlib.util
import inspect
import functools
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                reason="deepspeed is not installed (pip install -e '.[deepspeed]')")

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "deepspeed_worker.py"
EXAMPLE = REPO / "examples" / "deepspeed"
BIN = Path(sys.executable).parent
FIRST_JOB_TIMEOUT_S = 420  # the first job may compile DeepSpeed's shm comm op (~65 s alone here)
_LAUNCHER_PREFIXES = ("OMPI_", "PMI_", "PMIX_", "SLURM_", "SFA_", "TORCHELASTIC_", "MASTER_", "LOCAL_", "CROSS_")
_LAUNCHER_NAMES = {"RANK", "WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE"}

# Tolerances (max |param difference|, fp32 params of size ~0.1-1):
# sharded mode vs DDP + torch.optim.Adam(fused=True): the clipping coefficient comes from a
#   global norm summed in another order (our shards vs torch's per-param norms), so it differs
#   in its last bits; measured <= 6e-8 over 8 steps.
SHARDED_VS_DDP_TOL = 1e-6
# resuming at 1 or 3 ranks: the gradient is averaged over other splits of the same global
#   batch, so it differs in its last bits; measured <= 6e-8 after 3 steps.
RESUME_TOL = 1e-6
# delegated mode vs DDP: DeepSpeed steps one flat partition per rank, whose ends are not the
#   params' ends, and torch's CPU fused kernel rounds each tensor's last numel % 16 elements in a
#   scalar loop (see ZERO_PARTITION_TOL in test_convert_deepspeed.py); with clipping, the norm is
#   also summed in another order (measured <= 1e-9 at stage 2 unclipped, <= 3e-8 at stage 1 with
#   clipping). Against DeepSpeed's own Adam on the same partitions it is bitwise (0.0).
DELEGATED_VS_DDP_TOL = 1e-6


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in _LAUNCHER_NAMES and not k.startswith(_LAUNCHER_PREFIXES)}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               TORCH_EXTENSIONS_DIR=str(REPO / ".cache" / "torch_extensions"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    return env


def _free_port() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def _launch(cmd: list[str], timeout_s: float) -> str:
    """Run a launcher command in its own process group; kill the whole group on timeout."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} did not finish within {timeout_s:.0f} s:\n{output[-6000:]}")
    return output


def _torchrun(world_size: int, *args: str, timeout_s: float = FIRST_JOB_TIMEOUT_S) -> str:
    return _launch([str(BIN / "torchrun"), "--nproc-per-node", str(world_size), "--master-addr", "127.0.0.1",
                    "--master-port", _free_port(), *args], timeout_s)


_PROBE = """
import json
from deepspeed.accelerator import get_accelerator
accelerator = get_accelerator()
print(json.dumps({"name": accelerator.device_name(), "fp16": bool(accelerator.is_fp16_supported()),
                  "bf16": bool(accelerator.is_bf16_supported())}))
"""


@functools.lru_cache(maxsize=None)
def half_sections() -> dict[str, str | None]:
    """For ``"fp16"`` and ``"bf16"``: None if DeepSpeed's CPU accelerator supports the config
    section here, else why not. Asked in a child process with the jobs' environment
    (``DS_ACCELERATOR=cpu``): DeepSpeed picks its accelerator once per process."""
    done = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["name"] == "cpu", answer
    needs = {"fp16": "; it needs avx512_fp16 or AMX-FP16", "bf16": ""}
    return {section: None if answer[section] else
            f'DeepSpeed\'s CPU accelerator reports no {section} support on this CPU (is_{section}_supported() is '
            f'False{needs[section]}), so a config with a "{section}" section raises ValueError'
            for section in ("fp16", "bf16")}


def _skip_unless_supported(section: str) -> None:
    reason = half_sections()[section]
    if reason is not None:
        pytest.skip(reason)


def _worker(scenario: str, world_size: int, out: Path, ckpt: Path) -> list[dict]:
    precisions = ",".join(section for section, reason in half_sections().items() if reason is None)
    output = _torchrun(world_size, str(WORKER), scenario, "--out", str(out), "--ckpt", str(ckpt),
                       "--precisions", precisions)
    files = [out / f"{scenario}_w{world_size}_rank{r}.json" for r in range(world_size)]
    missing = [f.name for f in files if not f.exists()]
    assert not missing, f"no result from {missing}:\n{output[-8000:]}"
    return [json.loads(f.read_text()) for f in files]


@pytest.fixture(scope="module")
def job_dir(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("deepspeed")
    (root / "out").mkdir()
    (root / "ckpt").mkdir()
    return SimpleNamespace(out=root / "out", ckpt=root / "ckpt")


@pytest.fixture(scope="module")
def sharded(job_dir) -> list[dict]:
    """ZeRO stage 0 on 2 ranks: parity, overflow, comm counts, and the checkpoint for ``resume``."""
    return _worker("sharded", 2, job_dir.out, job_dir.ckpt)


@pytest.fixture(scope="module")
def delegated(job_dir) -> list[dict]:
    return _worker("delegated", 2, job_dir.out, job_dir.ckpt)


# ---- sharded mode (ZeRO stage 0) ---------------------------------------------------------
def test_sharded_engine_is_wired(sharded):
    for r in sharded:
        assert r["is_sharded"] and r["engine_optimizer_is_opt"], r["optimizer_type"]
        assert r["enable_backward_allreduce"] is False
        assert r["engine_gradient_clipping"] == 0.0 and r["max_grad_norm"] == 0.5  # moved, not applied twice


def test_sharded_matches_ddp_adam_and_learns(sharded):
    for r in sharded:
        diffs = [s["diff"] for s in r["steps"]]
        assert max(diffs) <= SHARDED_VS_DDP_TOL, diffs
        assert r["eval_after"] < 0.9 * r["eval_before"], (r["eval_before"], r["eval_after"])
        norms = [(s["grad_norm"], s["ref_norm"]) for s in r["steps"] if not s["overflow"]]
        assert all(abs(a - b) <= 1e-5 * b for a, b in norms), norms
        assert any(a > 0.5 for a, _ in norms)  # the clipping was active, on both sides
        assert r["steps"][0]["loss_scale"] == 2.0**16  # "loss_scale": "dynamic" reached engine.backward


def test_sharded_overflow_skips_step_and_scheduler_on_every_rank(sharded):
    for r in sharded:
        inject = r["steps"][3]
        assert inject["overflow"] and not inject["applied"] and inject["skipped_steps"] == 1
        iterations = [s["scheduler_iteration"] for s in r["steps"]]
        assert iterations == [0, 1, 2, 2, 3, 4, 5, 6], iterations
        lrs = [s["lr"] for s in r["steps"]]
        assert lrs[3] == lrs[4] and lrs[2] < lrs[3], lrs  # the LR did not advance over the skipped step


def _all_reduced(calls: list) -> int:
    return sum(numel for op, numel in calls if op == "all_reduce")


def test_sharded_gradients_reduced_once(sharded):
    for r in sharded:
        bucket, numel = r["bucket_padded_numel"], r["param_numel"]
        for s in r["steps"]:
            if s["overflow"]:
                continue
            # One reduce-scatter (gloo: isend/irecv) of the padded buckets (< 10% padding here),
            # and as all-reduce only the small stats (overflow flag, norm, one has-grad flag per
            # param); nothing from the engine.
            assert s["opt_comm_bytes"]["reduce_scatter"] == 4 * bucket
            assert 0 < _all_reduced(s["collectives"]) <= 16, s["collectives"]
        # Control: the engine's own all-reduce switched back on adds its full-size reduction.
        assert _all_reduced(r["control_collectives"]) >= numel, r["control_collectives"]


def test_sharded_gradient_accumulation_and_engine_no_sync(sharded):
    for r in sharded:
        acc = r["accumulation"]
        # Same arithmetic as DDP with no_sync on the first micro-batch: bitwise.
        assert acc["diffs"] == [0.0, 0.0, 0.0] and acc["global_steps"] == 3, acc
        assert acc["no_sync_reduced_numel"] == 0  # engine.no_sync() also paused the optimizer's reductions


def test_sharded_half_model_with_our_loss_scale(sharded):
    """The replacement the fp16-section error recommends: bitwise the hand-written loop."""
    for r in sharded:
        fp16 = r["fp16_model"]
        assert fp16["dtype"] == "torch.float16" and fp16["has_masters"]
        assert fp16["diffs"] == [0.0] * 4 and all(a == b == 2.0**16 for a, b in fp16["scales"]), fp16
        assert fp16["eval"][1] < 0.9 * fp16["eval"][0], fp16["eval"]


@pytest.mark.parametrize("section", ["bf16", "fp16"])
def test_sharded_config_with_precision_section_wires_itself(sharded, section):
    """register() alone + plain deepspeed.initialize: no FP16/BF16 wrapper, our fp32 masters and
    loss scaler, bitwise the same optimizer in a hand-written loop on a model cast by hand."""
    _skip_unless_supported(section)
    for r in sharded:
        res = r["precision_sections"][section]
        assert (res["optimizer"], res["unwrapped"], res["allreduce"]) == ("DeepSpeedShardedFusedAdam", True, False)
        assert res["dtype"] == {"bf16": "torch.bfloat16", "fp16": "torch.float16"}[section] and res["has_masters"]
        assert res["max_grad_norm"] == 0.5 and res["diffs"] == [0.0] * 6, res
        assert all(a == b for a, b in res["scales"]) and all(a == b for a, b in res["norms"]), res
        assert res["eval"][1] < 0.9 * res["eval"][0], res["eval"]
    if section == "fp16":  # initial_scale_power 8, loss_scale_window 3: grows to 2**9 after 3 clean steps
        assert [a for a, _ in sharded[0]["precision_sections"]["fp16"]["scales"]][:3] == [256.0, 256.0, 512.0]


@pytest.mark.parametrize("world_size", [1, 3])
def test_sharded_checkpoint_resumes_at_other_world_size(sharded, job_dir, world_size):
    results = _worker("resume", world_size, job_dir.out, job_dir.ckpt)
    for r in results:
        assert r["saved_world_size"] == 2
        assert r["module_equal"] and r["state_keys_equal"] and r["state_equal"], r
        assert r["lr_equal"] and r["loss_scaler_equal"] and r["scheduler_equal"], r
        assert (r["global_steps"], r["skipped_steps"]) == (5, 1)
        assert r["final_diff"] <= RESUME_TOL, r["final_diff"]


# ---- delegated mode (ZeRO stage 1/2) -----------------------------------------------------
def test_delegated_stage2_matches_ddp_adam_and_learns(delegated):
    for r in delegated:
        z2 = r["z2_adam"]
        assert (z2["basic"], z2["wrapper"]) == ("FusedAdam", "DeepSpeedZeroOptimizer")
        assert z2["state_keys"] == ["exp_avg", "exp_avg_sq", "step"]  # torch layout on DeepSpeed's partition
        assert max(z2["diffs"]) <= DELEGATED_VS_DDP_TOL, z2["diffs"]
        assert z2["losses"][1] < 0.9 * z2["losses"][0], z2["losses"]


def test_delegated_stage1_adamw_with_deepspeed_clipping(delegated):
    for r in delegated:
        z1 = r["z1_adamw_clipped"]
        assert z1["basic"] == "FusedAdam" and z1["adamw"] is True
        assert max(z1["diffs"]) <= DELEGATED_VS_DDP_TOL, z1["diffs"]
        assert z1["losses"][1] < 0.9 * z1["losses"][0], z1["losses"]


def test_delegated_bitwise_equal_to_deepspeed_own_adam(delegated):
    for r in delegated:
        single = r["reference_vs_torch_adam"]
        assert single["theirs"] == "Adam" and single["theirs_fused"] is None and max(single["diffs"]) == 0.0
        fused = r["torch_fused_vs_torch_adam_fused"]
        assert fused["theirs_fused"] is True and max(fused["diffs"]) == 0.0


def test_delegated_stage2_with_deepspeed_bf16(delegated):
    _skip_unless_supported("bf16")
    for r in delegated:
        bf16 = r["z2_bf16"]
        assert (bf16["basic"], bf16["model_dtype"], bf16["state_dtype"]) == ("FusedAdam", "torch.bfloat16",
                                                                             "torch.float32")
        assert bf16["eval"][1] < 0.9 * bf16["eval"][0], bf16["eval"]


def test_delegated_checkpoint_round_trip(delegated):
    for r in delegated:
        assert r["z2_checkpoint_diff"] == 0.0


# ---- the example, under both launchers ---------------------------------------------------
def _example_summary(tmp_path: Path, output: str) -> dict:
    summary = tmp_path / "summary.json"
    assert summary.exists(), output[-8000:]
    return json.loads(summary.read_text())


def test_example_sharded_under_deepspeed_launcher(tmp_path):
    output = _launch([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", _free_port(),
                      str(EXAMPLE / "train.py"), "--deepspeed_config", str(EXAMPLE / "ds_config_sharded.json"),
                      "--steps", "20", "--summary", str(tmp_path / "summary.json")], FIRST_JOB_TIMEOUT_S)
    s = _example_summary(tmp_path, output)
    assert (s["mode"], s["world_size"], s["optimizer"]) == ("sharded", 2, "DeepSpeedShardedFusedAdam")
    assert sum(s["losses"][-5:]) < 0.85 * sum(s["losses"][:5]), s["losses"]


def test_example_zero2_under_torchrun(tmp_path):
    output = _torchrun(2, str(EXAMPLE / "train.py"), "--deepspeed_config", str(EXAMPLE / "ds_config_zero2.json"),
                       "--steps", "20", "--summary", str(tmp_path / "summary.json"))
    s = _example_summary(tmp_path, output)
    assert (s["mode"], s["optimizer"], s["wrapper"]) == ("delegated", "FusedAdam", "DeepSpeedZeroOptimizer")
    assert sum(s["losses"][-5:]) < 0.85 * sum(s["losses"][:5]), s["losses"]


# ---- configs, registration and wiring, in this process (no engine) -----------------------
@pytest.fixture
def sfa_ds(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from sharded_fused_adam.integrations import deepspeed as module

    yield module
    for name in module.OPTIMIZER_NAMES:
        if hasattr(torch.optim, name):
            delattr(torch.optim, name)


def _config(stage: int = 0, type_: str = "ShardedFusedAdam", **params: Any) -> dict:
    return {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage},
            "optimizer": {"type": type_, "params": {"lr": 1e-3, **params}}}


@pytest.mark.parametrize("config, fragment", [
    (_config(0, momentum=0.9), "unknown key(s) ['momentum'] in optimizer.params for ShardedFusedAdam in sharded mode"),
    (_config(2, bucket_cap_mb=10), "bucket_cap_mb only apply in sharded mode"),
    (_config(2, loss_scale="dynamic"), "accepted keys: ['lr', 'betas', 'eps', 'weight_decay', 'amsgrad'"),
    ({**_config(0, loss_scale=128), "fp16": {"enabled": True}}, "drop optimizer.params.loss_scale"),
    ({**_config(0), "torch_autocast": {"enabled": True}}, "torch_autocast"),
    ({**_config(0), "communication_data_type": "bf16"}, "use optimizer.params.reduce_dtype"),
    (_config(3), "zero_optimization.stage 3 is not supported"),
    (_config(0, torch_adam=True), "torch_adam chooses between DeepSpeed's own Adam implementations"),
    (_config(0, type_="shardedfusedadam"), 'must be spelled exactly "ShardedFusedAdam"'),
    (_config(0, type_="ShardedFusedAdamW", adam_w_mode=False), "ShardedFusedAdamW always decouples weight decay"),
    (_config(0, reduce_dtype="half"), "reduce_dtype must be one of"),
    (_config(0, type_="Adam"), "register() is for configs with"),
])
def test_bad_configs_are_rejected_before_deepspeed(sfa_ds, config, fragment):
    with pytest.raises(ValueError) as info:
        sfa_ds.register(config)
    assert fragment in str(info.value), str(info.value)
    assert not hasattr(torch.optim, "ShardedFusedAdam")


def test_register_binds_the_mode_of_the_config(sfa_ds):
    params = list(nn.Linear(3, 2).parameters())
    amended = sfa_ds.register(_config(2, type_="ShardedFusedAdamW", kernel="reference"))
    assert amended["zero_allow_untested_optimizer"] is True
    opt = torch.optim.ShardedFusedAdamW(params, lr=0.1, betas=[0.8, 0.9], adam_w_mode=True)
    assert type(opt).__name__ == "FusedAdam"
    assert opt.defaults["decoupled_weight_decay"] and opt.defaults["weight_decay"] == 1e-2
    assert opt.defaults["betas"] == (0.8, 0.9)

    sfa_ds.register(_config(0))
    opt = torch.optim.ShardedFusedAdam(params, lr=0.1, reduce_dtype="bf16", loss_scale=128.0)
    assert type(opt).__name__ == "DeepSpeedShardedFusedAdam" and opt.loss_scale == 128.0
    with pytest.raises(RuntimeError, match=r"call sharded_fused_adam\.integrations\.deepspeed\.wire\(engine\)"):
        opt.step()


def test_example_configs_register(sfa_ds):
    assert "zero_allow_untested_optimizer" not in json.loads((EXAMPLE / "ds_config_sharded.json").read_text())
    sfa_ds.register(EXAMPLE / "ds_config_sharded.json")
    assert torch.optim.ShardedFusedAdam.mode.name == "sharded"
    sfa_ds.register(str(EXAMPLE / "ds_config_zero2.json"))
    assert torch.optim.ShardedFusedAdam.mode.name == "delegated"


def test_names_do_not_collide_with_deepspeed_builtins(sfa_ds):
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    assert all(name.lower() not in DEEPSPEED_OPTIMIZERS for name in sfa_ds.OPTIMIZER_NAMES)


def test_initialize_takes_deepspeed_initialize_arguments(sfa_ds):
    import deepspeed

    ours = inspect.signature(sfa_ds.initialize).parameters
    theirs = inspect.signature(deepspeed.initialize).parameters
    assert list(ours) == list(theirs)
    assert {n: p.default for n, p in ours.items()} == {n: p.default for n, p in theirs.items()}


def _fake_engine(stage: int, optimizer: Any, basic: Any) -> SimpleNamespace:
    return SimpleNamespace(zero_optimization_stage=lambda: stage, optimizer=optimizer, basic_optimizer=basic)


def test_wire_rejects_engines_that_do_not_match(sfa_ds):
    from sharded_fused_adam import ShardedFusedAdam
    from sharded_fused_adam.local_adam import FusedAdam

    sharded = ShardedFusedAdam(nn.Linear(3, 2).parameters())
    local = FusedAdam(nn.Linear(3, 2).parameters())
    cases = [
        (_fake_engine(2, object(), sharded), "only works at stage 0: call register(config) with this config"),
        (_fake_engine(0, object(), sharded), "DeepSpeed wrapped ShardedFusedAdam in object"),
        (_fake_engine(0, local, local), "runs ZeRO stage 0 with FusedAdam, not ShardedFusedAdam"),
        (_fake_engine(1, object(), torch.optim.SGD(nn.Linear(3, 2).parameters(), lr=0.1)), "with SGD, not FusedAdam"),
        (_fake_engine(3, object(), local), "stage 3 is not supported"),
    ]
    for engine, fragment in cases:
        with pytest.raises(ValueError) as info:
            sfa_ds.wire(engine)
        assert fragment in str(info.value), str(info.value)
    sfa_ds.wire(_fake_engine(2, object(), local))  # delegated: nothing to wire

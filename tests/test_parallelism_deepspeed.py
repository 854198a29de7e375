"""DeepSpeed stage 0 with an ``mpu`` (Megatron-DeepSpeed): the engine hands it to ShardedFusedAdam.

Pipeline x data parallelism on 4 gloo ranks (stages hold unequal param sets); each rank's
module is ``sum(p * G)``, so ``engine.backward`` leaves exactly the full model's gradient
slice ``G`` in ``param.grad``. The config's ``gradient_clipping`` moves into the optimizer,
which must clip by the whole model's norm: params within 1e-5 of the single-process oracle
(the norm is summed in another order than torch's; see test_parallelism.py).
"""
from __future__ import annotations

import os

import pytest
import torch

from test_parallelism import NAMES, STAGES, STEPS, TOL, FakeMpu, _full_grads, _full_model, _groups


class DeepSpeedMpu(FakeMpu):
    """The rest of the mpu functions DeepSpeed's engine calls (pipeline-only: no tensor parallelism)."""

    def get_data_parallel_rank(self) -> int:
        return torch.distributed.get_rank(self._dp)

    def get_data_parallel_world_size(self) -> int:
        return torch.distributed.get_world_size(self._dp)

    def get_model_parallel_rank(self) -> int:
        return torch.distributed.get_rank(self._mp)

    def get_model_parallel_world_size(self) -> int:
        return torch.distributed.get_world_size(self._mp)

    get_tensor_model_parallel_world_size = staticmethod(lambda: 1)


class _Stage(torch.nn.Module):
    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.names = list(tensors)
        for n, t in tensors.items():
            self.register_parameter(n, torch.nn.Parameter(t.clone()))

    def forward(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum((getattr(self, n) * grads[n]).sum() for n in self.names)


def _pp_under_deepspeed(rank: int, world_size: int) -> list[float]:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world_size))  # what a launcher sets
    from sharded_fused_adam.integrations import deepspeed as sfa_ds

    dp_group, mp_group = _groups(rank)
    full = _full_model()
    oracle = [torch.nn.Parameter(full[n].clone()) for n in NAMES]
    ref = torch.optim.AdamW(oracle, lr=1e-2, weight_decay=0.1, fused=True)
    stage = _Stage({n: full[n] for n in STAGES[rank % 2]})
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_clipping": 1.0, "zero_optimization": {"stage": 0},
              "optimizer": {"type": "ShardedFusedAdamW", "params": {"lr": 1e-2, "weight_decay": 0.1}}}
    engine, opt, _, _ = sfa_ds.initialize(model=stage, config=config, mpu=DeepSpeedMpu(dp_group, mp_group, 0))
    assert opt.options.mpu is not None
    diffs = []
    for step in range(STEPS):
        grads = [_full_grads(oracle, step, d) for d in range(2)]
        engine.backward(engine(grads[rank // 2]))
        engine.step()
        for n, p in zip(NAMES, oracle):
            p.grad = (grads[0][n] + grads[1][n]) / 2
        torch.nn.utils.clip_grad_norm_(oracle, 1.0)
        ref.step()
        expected = dict(zip(NAMES, oracle))
        diffs.append(max((getattr(stage, n) - expected[n]).abs().max().item() for n in stage.names))
    return diffs


def test_deepspeed_stage0_hands_its_mpu_to_the_optimizer(ranks):
    pytest.importorskip("deepspeed")
    for diffs in ranks(_pp_under_deepspeed, 4, timeout_s=600):
        assert max(diffs) <= TOL, diffs

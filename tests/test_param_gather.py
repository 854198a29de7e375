"""Overlapped param gathers: every read waits for its bucket, results bitwise equal to waiting in step()."""
from __future__ import annotations

import io
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sharded_fused_adam import ShardedFusedAdam
from sharded_fused_adam.comm.plans import CommCounter, choose_comm_plan
from sharded_fused_adam.comm.param_gather import ParamGather
from sharded_fused_adam.testing import gathers_in_flight, wrap_gather_plan


class _LatePeer:
    """A plan whose gathers start late on the last rank, so the others' reads really wait."""

    def __init__(self, plan, delay_s: float):
        self._plan, self._delay_s = plan, delay_s

    def gather(self, flat, what="params"):
        if self._plan.rank == self._plan.world_size - 1:
            time.sleep(self._delay_s)
        return self._plan.gather(flat, what)

    def __getattr__(self, name):
        return getattr(self._plan, name)


# ---- the module alone ------------------------------------------------------------------------

def _standalone_rank(rank: int, world_size: int) -> dict:
    plan = _LatePeer(choose_comm_plan(None, torch.device("cpu"), "auto", CommCounter()), 0.3)
    shard = 5
    flats = [torch.full((shard * world_size,), -1.0) for _ in range(3)]
    params = []
    for k, flat in enumerate(flats):
        flat[rank * shard:(rank + 1) * shard] = 10 * k + rank
        params.append([flat[:4].view(2, 2), flat[4:]])  # two "params" per bucket
    gather = ParamGather(plan, params, overlap=True)
    early_view = params[1][1][1:]  # made before the gather: found through its _base
    for b in gather.gather_order([0, 1, 2]):
        gather.start(b, flats[b])
    gather.release()
    in_flight = len(gather.in_flight)
    # Reads of different kinds, each of one bucket: a function, a method, an older view.
    read = [torch.add(params[2][1], 0).tolist(), params[0][0].sum().item(), early_view.clone().tolist()]
    left = gather.in_flight
    gather.wait_all()
    want = [torch.arange(world_size).float().repeat_interleave(shard) + 10 * k for k in range(3)]
    expect = [want[2][4:].tolist(), want[0][:4].sum().item(), want[1][5:].tolist()]
    return dict(in_flight=in_flight, read_ok=read == expect, left=left,
                gathered=all(torch.equal(f, w) for f, w in zip(flats, want)))


@pytest.mark.parametrize("world_size", [2, 3])
def test_reads_wait_for_their_bucket(ranks, world_size):
    for r in ranks(_standalone_rank, world_size):
        assert r["in_flight"] == 3 and r["left"] == []
        assert r["read_ok"] and r["gathered"]


# ---- the optimizer: bitwise against overlap_param_gather=False -----------------------------

class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(32, 16)
        self.blocks = nn.ModuleList([nn.Linear(16, 16) for _ in range(3)])
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 32, bias=False)
        self.head.weight = self.emb.weight  # tied
        self.scale = nn.Parameter(torch.ones(16))  # read only outside any module's forward

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens)
        for block in reversed(self.blocks):  # called in another order than registered
            x = torch.tanh(block(x))
        return self.head(self.norm(x))


def _loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    base = model._orig_mod if hasattr(model, "_orig_mod") else model
    out = model(tokens)
    return F.cross_entropy(out.reshape(-1, 32), tokens.reshape(-1)) + (base.scale * out.mean(dim=(0, 1))[:16]).sum()


def _train(rank: int, world_size: int, overlap: bool, compiled: str, steps: int, grads: str = "sharded") -> dict:
    torch.manual_seed(0)
    model = _Net()
    opt = ShardedFusedAdam(model.parameters(), lr=1e-2, bucket_cap_mb=0.002, overlap_param_gather=overlap,
                           grads=grads)
    wrap_gather_plan(opt, lambda plan: _LatePeer(plan, 0.02))
    run = model
    if compiled == "wrapper":
        run = torch.compile(model, backend="eager")
    elif compiled == "in_place":
        model.compile(backend="eager")
    seen: dict = {"in_flight": [], "in_flight_after_zero_grad": [], "eval": [], "state": [], "saved": [],
                  "losses": []}
    gen = torch.Generator().manual_seed(100 + rank)
    for step in range(steps):
        tokens = torch.randint(0, 32, (2, 6), generator=gen)
        model.zero_grad()  # between step() and the next forward: neither waits for the gathers
        opt.zero_grad()
        seen["in_flight_after_zero_grad"].append(gathers_in_flight(opt))
        loss = _loss(run, tokens)
        loss.backward()
        opt.step()
        seen["in_flight"].append(gathers_in_flight(opt))
        seen["losses"].append(loss.item())
        if step == 1:  # eval, no_grad forward straight after a step
            model.eval()
            with torch.no_grad():
                seen["eval"].append(run(tokens).clone())
            model.train()
        if step == 2:  # state dicts and a checkpoint save between steps
            seen["state"].append({k: v.clone() for k, v in model.state_dict().items()})
            buf = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
            seen["saved"].append(buf.getvalue().__len__())
    opt.wait_for_gathers()
    seen["params"] = [p.detach().clone() for p in model.parameters()]
    return seen


def _compare(world_size: int, compiled: str, ranks, grads: str = "sharded") -> None:
    steps = 4
    plain = ranks(_train, world_size, False, compiled, steps, grads)
    overlapped = ranks(_train, world_size, True, compiled, steps, grads)
    for a, b in zip(plain, overlapped):
        assert a["losses"] == b["losses"]
        assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))
        assert all(torch.equal(x, y) for x, y in zip(a["eval"], b["eval"]))
        assert a["state"][0].keys() == b["state"][0].keys()
        assert all(torch.equal(a["state"][0][k], b["state"][0][k]) for k in a["state"][0])
        assert a["in_flight"] == [0] * steps
    # The overlap was real: the late peer's gathers were still in flight when step() returned.
    assert all(n > 0 for n in overlapped[0]["in_flight"]), overlapped[0]["in_flight"]
    # After step 0 nothing read the params before the zero_grads (later steps have reads).
    assert overlapped[0]["in_flight_after_zero_grad"][1] > 0, overlapped[0]["in_flight_after_zero_grad"]


@pytest.mark.parametrize("world_size", [2, 3])
def test_overlapped_gather_is_bitwise_equal_to_waiting_in_step(ranks, world_size):
    _compare(world_size, "", ranks)


def test_overlapped_gather_with_replicated_gradients(ranks):
    _compare(2, "", ranks, "replicated")  # param.grad views and model.zero_grad() between steps


def test_overlapped_gather_with_a_compiled_model(ranks):
    _compare(2, "wrapper", ranks)  # torch.compile(model): everything is waited for before dynamo runs


@pytest.mark.slow
def test_overlapped_gather_with_a_model_compiled_in_place(ranks):
    _compare(2, "in_place", ranks)  # model.compile(): dynamo traces through the read guard (~1 min here)

"""Quick start: ShardedFusedAdam where you used ``torch_npu.optim.NpuFusedAdam``.

    python examples/npu_quickstart.py                               # one rank: NPU if present, else CUDA, else CPU
    python -m launcher --nproc-per-node 2 examples/npu_quickstart.py  # the same, sharded over 2 ranks

Part 1 is NpuFusedAdam's own example (mixed fp32/fp16 params, the last one without a
gradient, lr 2e-3, weight_decay 0.05) with the class name swapped, checked against
``torch.optim.Adam`` run in fp32 on the same gradients. Part 2 trains a tiny model with
``torch.amp.GradScaler``, fp16 params on an accelerator and fp32 params under bf16 autocast
on the CPU, and forces an overflow on rank 0 to show the step being skipped on every rank.

``launcher.init_distributed()`` picks the device: it imports torch_npu only when it is
installed, and a plain ``python`` run still gets a (1-rank) process group.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

import launcher
from sharded_fused_adam import ShardedFusedAdam

OPT_KWARGS = dict(eps=1e-8, betas=(0.9, 0.999), lr=2e-3, weight_decay=0.05)


def say(text: str) -> None:
    """Print on rank 0 only."""
    if dist.get_rank() == 0:
        print(text, flush=True)


def create_simple_params_and_grads(device: torch.device) -> list[torch.Tensor]:
    """NpuFusedAdam's example params: fp32 and fp16 tensors; all but the last get a gradient."""
    params = [
        torch.arange(6).reshape(2, 3).float(),
        torch.arange(12).reshape(4, 3).float(),
        torch.arange(6).reshape(2, 3).half(),
        torch.arange(12).reshape(4, 3).half(),
        torch.arange(15).reshape(5, 3).float(),
        torch.arange(18).reshape(6, 3).half(),
        torch.arange(6).reshape(2, 3).float(),
    ]
    params = [p.to(device) for p in params]
    for i, p in enumerate(params):
        if i < len(params) - 1:
            p.requires_grad = True
            p.grad = p.clone().detach() / 100.0
    return params


def part1_drop_in(device: torch.device) -> None:
    params = create_simple_params_and_grads(device)
    # The reference: torch.optim.Adam on fp32 copies, fed the same gradients (fp16 -> fp32 is exact).
    ref = [p.detach().float().clone().requires_grad_(p.requires_grad) for p in params]
    for r, p in zip(ref, params):
        r.grad = None if p.grad is None else p.grad.float()
    before_last = params[-1].detach().clone()

    fused_opt = ShardedFusedAdam(params, **OPT_KWARGS)   # was: NpuFusedAdam(params, **opt_kwargs)
    with torch.no_grad():
        fused_opt.step()
    torch.optim.Adam([r for r in ref if r.requires_grad], **OPT_KWARGS).step()

    say("part 1: NpuFusedAdam's example, one step")
    for i, (p, r) in enumerate(zip(params, ref)):
        expected = r.detach().to(p.dtype)  # fp16 params: fp32 master weights, rounded once
        torch.testing.assert_close(p.detach(), expected)
        diff = (p.detach().float() - expected.float()).abs().max().item()
        say(f"  param {i}: {str(p.dtype):13} grad={'yes' if r.grad is not None else 'no ':3}  "
              f"max |p - torch.optim.Adam| = {diff:.2e}")
    if not torch.equal(params[-1].detach(), before_last):
        raise AssertionError("the param without a gradient changed")
    say("  the param without a gradient is unchanged")


def part2_grad_scaler(device: torch.device) -> None:
    on_cpu = device.type == "cpu"
    param_dtype = torch.float32 if on_cpu else torch.float16
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1)).to(device, param_dtype)
    opt = ShardedFusedAdam(model.parameters(), lr=1e-2, max_grad_norm=1.0)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**16)
    g = torch.Generator().manual_seed(dist.get_rank())
    say(f"part 2: GradScaler loop, {param_dtype} params"
          f"{' under bf16 autocast' if on_cpu else ''} on {device}")
    for step in range(16):
        x = torch.randn(16, 8, generator=g).to(device, param_dtype)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_cpu):
            loss = nn.functional.mse_loss(model(x).float(), torch.tanh(x[:, :2].float().sum(1, keepdim=True)))
        if step == 5 and dist.get_rank() == 0:
            loss = loss * float("inf")   # an overflow in backward, on rank 0 only
        snapshot = [p.detach().clone() for p in model.parameters()]
        scale = scaler.get_scale()
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)                 # unscales, clips, skips on overflow (every rank agrees)
        scaler.update()
        unchanged = all(torch.equal(a, p.detach()) for a, p in zip(snapshot, model.parameters()))
        if opt.overflow != (step == 5):
            raise AssertionError(f"step {step}: overflow={opt.overflow} on rank {dist.get_rank()}")
        if opt.overflow:
            if not unchanged:
                raise AssertionError("a step with an overflow changed the params")
            say(f"  step {step:2d}: overflow on rank 0 -> step skipped on all {dist.get_world_size()} rank(s), "
                f"params unchanged, scale {scale:g} -> {scaler.get_scale():g}")
        else:
            say(f"  step {step:2d}: loss {loss.item():.4f}  grad norm {opt.get_global_grad_norm():.3f}  "
                  f"scale {scale:g}")


def main() -> None:
    device = launcher.init_distributed()
    try:
        say(f"device {device}, {dist.get_world_size()} rank(s), backend {dist.get_backend()}")
        part1_drop_in(device)
        part2_grad_scaler(device)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

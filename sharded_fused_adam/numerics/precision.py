"""Overflow detection, loss scaling and global gradient-norm clipping (local math, no collectives).

[Note: one scale]
Before the update every gradient shard is multiplied once by
``clip_coef / loss_scale``: unscaling (our own loss scaler or a ``torch.amp.GradScaler``)
and norm clipping are folded into a single pass. The global norm comes from the same
small all-reduce that carries the overflow flag and the has-gradient mask, so a step costs
one extra read of the gradient shard and one collective of ``num_params + 2`` floats.
Loss scales are powers of two in practice, so multiplying by ``1 / scale`` is exact and
matches ``torch.optim.Adam(fused=True)``'s in-kernel division bit for bit.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence, Union

import torch

__all__ = [
    "GradStats",
    "LossScaler",
    "StaticLossScaler",
    "DynamicLossScaler",
    "make_loss_scaler",
    "local_stats",
    "any_non_finite",
    "read_stats",
    "clip_coefficient",
    "report_to_grad_scaler",
    "scale_for_step",
]


@dataclass(frozen=True)
class GradStats:
    """Global facts about the averaged gradients, identical on every rank.

    ``norm`` is of the gradients as stored (still multiplied by any loss scale);
    ``has_grad[i]`` says whether param ``i`` got a gradient on any rank.
    """

    found_inf: bool
    norm: float
    norm_type: float
    has_grad: tuple[bool, ...]


def local_stats(
    grad_shards: Sequence[torch.Tensor], has_grad: Sequence[bool], norm_type: float, device: torch.device
) -> torch.Tensor:
    """This rank's contribution ``[non-finite flag, norm piece, has_grad...]`` as one fp32 tensor.

    The norm piece is the sum of squares for ``norm_type`` 2 (ranks then SUM) or the max
    magnitude for ``inf`` (ranks then MAX); other p-norms sum ``|g|**p``. The flag is set
    when the norm piece is not finite, read on no host: a non-finite element sets it, and so
    does a sum of squares that overflowed over finite elements, which ``any_non_finite``
    tells apart where the combined flag is set (rare; see [Note: one host sync per step]).
    """
    if grad_shards:
        norms = torch.stack(torch._foreach_norm(list(grad_shards), norm_type)).float()
        piece = norms.max() if math.isinf(norm_type) else norms.pow(norm_type).sum()
        bad = ~torch.isfinite(piece)
    else:
        piece = torch.zeros((), device=device)
        bad = torch.zeros((), dtype=torch.bool, device=device)
    mask = torch.tensor(list(has_grad), dtype=torch.float32, device=device)
    return torch.cat([bad.float().reshape(1).to(device), piece.reshape(1).to(device), mask])


def any_non_finite(grad_shards: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """A 1-element fp32 flag: 1 where some element of ``grad_shards`` is inf or NaN (no host sync)."""
    if not grad_shards:
        return torch.zeros(1, device=device)
    return torch.stack([~torch.isfinite(g).all() for g in grad_shards]).any().float().reshape(1).to(device)


def read_stats(reduced: torch.Tensor, norm_type: float) -> GradStats:
    """Interpret ``local_stats`` after the all-reduce (SUM, or MAX for the inf-norm)."""
    values = reduced.tolist()
    norm = values[1] if math.isinf(norm_type) else values[1] ** (1.0 / norm_type)
    return GradStats(values[0] > 0, norm, norm_type, tuple(v > 0 for v in values[2:]))


def clip_coefficient(norm: float, max_norm: float) -> float:
    """``torch.nn.utils.clip_grad_norm_``'s factor: ``max_norm / (norm + 1e-6)``, at most 1."""
    return min(1.0, max_norm / (norm + 1e-6))


class LossScaler:
    """A loss scale and its reaction to overflow. This base is a static scale (1: none).

    A static scale cannot adapt, so every step skipped for a non-finite gradient would repeat
    in silence: it warns at the 1st, 10th and every 100th skipped step.
    """

    def __init__(self, scale: float = 1.0):
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"loss scale must be a positive finite number, got {scale}")
        self.scale = float(scale)
        self.num_skipped = 0

    def update(self, found_inf: bool) -> None:
        """Adjust after a step that did (``found_inf``) or did not overflow."""
        if not found_inf:
            return
        self.num_skipped += 1
        if self.num_skipped in (1, 10) or self.num_skipped % 100 == 0:
            warnings.warn(f"step() skipped: a gradient on some rank is inf or NaN ({self.num_skipped} step(s) "
                          "skipped so far, step counts did not advance). A static loss scale never adapts: "
                          "check the loss and learning rate, or use loss_scale='dynamic' or "
                          "torch.amp.GradScaler for fp16.", RuntimeWarning, stacklevel=5)

    def state_dict(self) -> dict:
        return {"scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])


StaticLossScaler = LossScaler


class DynamicLossScaler(LossScaler):
    """DeepSpeed-style dynamic loss scaling.

    On overflow the step is skipped; the first ``hysteresis - 1`` overflows since the last
    growth only use up the hysteresis, later ones multiply the scale by ``backoff_factor``
    (not below ``min_scale``). After ``growth_interval`` overflow-free steps the scale is
    multiplied by ``growth_factor`` and the hysteresis is restored.
    """

    def __init__(
        self,
        init_scale: float = 2.0**16,
        *,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 1000,
        hysteresis: int = 2,
        min_scale: float = 1.0,
    ):
        super().__init__(init_scale)
        if growth_factor <= 1:
            raise ValueError(f"growth_factor must be > 1, got {growth_factor}")
        if not 0 < backoff_factor < 1:
            raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor}")
        if growth_interval < 1:
            raise ValueError(f"growth_interval must be >= 1, got {growth_interval}")
        if hysteresis < 1:
            raise ValueError(f"hysteresis must be >= 1, got {hysteresis}")
        if not 0 < min_scale <= init_scale:
            raise ValueError(f"min_scale must be in (0, init_scale={init_scale}], got {min_scale}")
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.hysteresis = hysteresis
        self.min_scale = min_scale
        self.hysteresis_left = hysteresis
        self.good_steps = 0

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.good_steps = 0
            if self.hysteresis_left > 1:
                self.hysteresis_left -= 1
            else:
                self.scale = max(self.scale * self.backoff_factor, self.min_scale)
            return
        self.good_steps += 1
        if self.good_steps == self.growth_interval:
            self.scale *= self.growth_factor
            self.good_steps = 0
            self.hysteresis_left = self.hysteresis

    def state_dict(self) -> dict:
        return {"scale": self.scale, "hysteresis_left": self.hysteresis_left, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.hysteresis_left = int(state.get("hysteresis_left", self.hysteresis))
        self.good_steps = int(state.get("good_steps", 0))


def make_loss_scaler(loss_scale: Union[None, float, str, LossScaler]) -> LossScaler:
    """``None`` -> no scaling, a number -> static, ``"dynamic"`` -> ``DynamicLossScaler()``.

    Raises:
        ValueError: an unknown string or a non-positive scale.
        TypeError: any other type.
    """
    if loss_scale is None:
        return LossScaler(1.0)
    if isinstance(loss_scale, LossScaler):
        return loss_scale
    if isinstance(loss_scale, str):
        if loss_scale != "dynamic":
            raise ValueError(f"loss_scale must be a number, 'dynamic', a LossScaler or None, got {loss_scale!r}")
        return DynamicLossScaler()
    if isinstance(loss_scale, (int, float)) and not isinstance(loss_scale, bool):
        return LossScaler(float(loss_scale))
    raise TypeError(f"loss_scale must be a number, 'dynamic', a LossScaler or None, got {type(loss_scale).__name__}")


def report_to_grad_scaler(grad_scaler: Any, optimizer_id: int, found_inf: bool) -> None:
    """Tell a ``torch.amp.GradScaler`` (or torch_npu's) the global overflow verdict of a step.

    ``GradScaler.update()`` reads ``found_inf_per_device``; the stock scaler cannot see our
    gradient shards, so the global verdict is recorded there (as Apex's distributed
    optimizer does), which makes every rank's scaler back off together. torch_npu's scaler
    inherits this step path but decides ``update()`` by its own ``_has_overflow`` flag, which
    only its (here skipped) unscale would set.
    """
    device = grad_scaler._scale.device
    state = grad_scaler._per_optimizer_states[optimizer_id]
    state["found_inf_per_device"] = {device: torch.full((), float(found_inf), device=device)}
    if hasattr(grad_scaler, "_has_overflow"):
        grad_scaler._has_overflow = bool(found_inf)


def scale_for_step(loss_scaler: LossScaler, grad_scaler: Any) -> float:
    """The loss scale the gradients of this step carry: ours, or a ``torch.amp.GradScaler``'s.

    Raises:
        ValueError: both scale the loss.
    """
    if grad_scaler is None:
        return loss_scaler.scale
    if loss_scaler.scale != 1.0 or type(loss_scaler) is not LossScaler:
        raise ValueError("use either ShardedFusedAdam(loss_scale=...) or torch.amp.GradScaler, not both")
    return float(grad_scaler.get_scale())

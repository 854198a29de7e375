"""Compact optimizer state: fp32 masters kept as the bf16 param plus an int16 residual, bit for bit.

[Note: split masters]
A bf16 number is the upper half of an fp32 bit pattern, so for a bf16 model the fp32 master
``M`` of the owned shard can be stored as the bf16 param ``P`` every rank holds anyway plus a
16-bit residual. ``P`` must be ``M`` rounded to nearest-even (what ``M.to(torch.bfloat16)``
gives and what the model must see), not the truncated upper half, so the residual is the
difference of the bit patterns read as integers, ``bits(M) - bits(P) * 2**16``. Bit patterns
of same-sign floats are ordered like their values and rounding keeps the sign, so that
difference lies in ``[-2**15, 2**15]`` for every finite or infinite ``M``, carries into the
exponent and overflow to inf included: it is the low 16 bits of ``M`` read as a signed
integer, except for one value. When ``M`` lies exactly halfway between two bf16 numbers and
the tie went down to the even one, the difference is ``+2**15``, which int16 cannot hold
(its low bits read ``-2**15``). That is unavoidable: 65,537 fp32 values round to each even
bf16 number, so no 16-bit residual alone can tell them apart. Those elements (about one in
131,072 of a trained master) are kept as a short list of indices per chunk and get the
missing ``2**16`` back when the master is rebuilt. NaN masters come back as NaN, not with
their payload (rounding to bf16 already discards it): a NaN has no value to preserve.

The kernel never sees the split form: ``Bucket`` rebuilds one chunk of the master in fp32
scratch, runs the fused kernel on it and splits the result again (see [Note: staged update]
in bucket.py). fp16 has a narrower exponent than fp32, so an fp16 param plus 16 bits cannot
hold every fp32 master (small or large weights lose up to all of their bits); fp16 models
keep 4-byte masters.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch

__all__ = ["CHUNK_NUMEL", "MASTER_WEIGHTS", "SplitMaster", "join_fp32", "resolve_master_weights", "split_fp32"]

# Elements staged per kernel call: small enough that the fp32 scratch of one chunk stays in
# the L2 cache, large enough that the per-op overhead is small; a multiple of 16 (vector lanes).
CHUNK_NUMEL = 1 << 15
MASTER_WEIGHTS = ("auto", "fp32", "split")
_HALF = 1 << 15   # 2**15: the residual of a tie
_UNIT = 1 << 16   # one bf16 step in fp32 bit patterns
_BLOCK = 512      # tie search: blocks whose minimum is -2**15 are searched element by element


def split_fp32(values: torch.Tensor, param_out: torch.Tensor, residual_out: torch.Tensor) -> Optional[torch.Tensor]:
    """Split fp32 ``values`` into ``param_out`` (bf16, rounded to nearest-even) and ``residual_out``
    (int16); see [Note: split masters].

    Returns:
        The indices (int64) of the elements whose residual is ``+2**15`` (ties that went down),
        or None if there are none. ``join_fp32`` needs them to rebuild ``values`` exactly.
    """
    return _split(values, values.view(torch.int32), param_out, param_out.view(torch.int16), residual_out)


def join_fp32(param: torch.Tensor, residual: torch.Tensor, down_ties: Optional[torch.Tensor],
              out: torch.Tensor) -> torch.Tensor:
    """Rebuild the fp32 values ``split_fp32`` split into ``param``, ``residual`` and ``down_ties``, into ``out``."""
    _join(param.view(torch.int16), residual, down_ties, out.view(torch.int32))
    return out


def _split(values: torch.Tensor, bits: torch.Tensor, param: torch.Tensor, param_bits: torch.Tensor,
           residual: torch.Tensor) -> Optional[torch.Tensor]:
    """``split_fp32`` given the int views too (``bits`` of ``values``, ``param_bits`` of ``param``)."""
    param.copy_(values)  # torch's rounding, the one the fp32-master path publishes with
    residual.copy_(bits)  # int32 -> int16 keeps the low 16 bits: bits(M) - bits(P) * 2**16 mod 2**16
    if int(residual.min()) != -_HALF:  # one fast reduction: most chunks hold no tie at all
        return None
    ties = _tie_positions(residual)
    upper = torch.bitwise_right_shift(bits[ties], 16).to(torch.int16)
    down = ties[param_bits[ties] == upper]  # the param is the upper half: the tie went down
    return down if down.numel() else None


def _join(param_bits: torch.Tensor, residual: torch.Tensor, down_ties: Optional[torch.Tensor],
          out_bits: torch.Tensor) -> None:
    out_bits.copy_(param_bits)                                # sign-extended: bits(P) * 2**16 fits int32
    torch.add(residual, out_bits, alpha=_UNIT, out=out_bits)  # residual + bits(P) * 2**16
    if down_ties is not None:
        out_bits[down_ties] += _UNIT


def _tie_positions(residual: torch.Tensor) -> torch.Tensor:
    """Indices where ``residual == -2**15``, searching only the blocks that hold one."""
    numel = residual.numel()
    head = numel - numel % _BLOCK
    found = []
    if head:
        blocks = residual[:head].view(-1, _BLOCK)
        hit = (blocks.amin(dim=1) == -_HALF).nonzero().squeeze(1)
        if hit.numel():
            where = (blocks[hit] == -_HALF).nonzero()
            found.append(hit[where[:, 0]] * _BLOCK + where[:, 1])
    if head < numel:
        found.append((residual[head:] == -_HALF).nonzero().squeeze(1) + head)
    return torch.cat(found) if len(found) > 1 else found[0]


class SplitMaster:
    """One shard's fp32 master held as its bf16 param shard plus an int16 residual, by chunks.

    Args:
        param_shard: this rank's bf16 slice of the flat params (a view; written on every split).
        chunk_numel: elements per chunk (a multiple of 16); chunk ``k`` covers
            ``[k * chunk_numel, (k + 1) * chunk_numel)`` of the shard.
    """

    def __init__(self, param_shard: torch.Tensor, chunk_numel: int = CHUNK_NUMEL):
        assert param_shard.dtype == torch.bfloat16 and chunk_numel % 16 == 0, (param_shard.dtype, chunk_numel)
        self.param = param_shard
        self.numel = param_shard.numel()
        self.chunk_numel = chunk_numel
        self.residual = torch.zeros(self.numel, dtype=torch.int16, device=param_shard.device)
        self.num_chunks = -(-self.numel // chunk_numel)
        self._down_ties: list[Optional[torch.Tensor]] = [None] * self.num_chunks
        # Views per chunk, cut once: a step touches every chunk, and each view costs microseconds.
        self._params = [self._cut(param_shard, k) for k in range(self.num_chunks)]
        self._param_bits = [p.view(torch.int16) for p in self._params]
        self._residuals = [self._cut(self.residual, k) for k in range(self.num_chunks)]

    def _cut(self, t: torch.Tensor, k: int) -> torch.Tensor:
        start = k * self.chunk_numel
        return t.narrow(0, start, min(self.chunk_numel, self.numel - start))

    @property
    def nbytes(self) -> int:
        """The residual plus the down-tie index lists (the bf16 params are the model's own)."""
        ties = sum(t.numel() * t.element_size() for t in self._down_ties if t is not None)
        return self.residual.numel() * self.residual.element_size() + ties

    @property
    def num_down_ties(self) -> int:
        return sum(t.numel() for t in self._down_ties if t is not None)

    def join(self, k: int, out_bits: torch.Tensor) -> None:
        """Chunk ``k`` of the master, written as fp32 bit patterns into ``out_bits`` (int32, the chunk's numel)."""
        _join(self._param_bits[k], self._residuals[k], self._down_ties[k], out_bits)

    def split(self, k: int, values: torch.Tensor, bits: torch.Tensor) -> None:
        """Store chunk ``k`` of the master from fp32 ``values`` (``bits``: the same memory as int32),
        rounding them into the params."""
        self._down_ties[k] = _split(values, bits, self._params[k], self._param_bits[k], self._residuals[k])

    def full(self) -> torch.Tensor:
        """The whole master shard as a new fp32 tensor."""
        out = torch.empty(self.numel, dtype=torch.float32, device=self.param.device)
        for k in range(self.num_chunks):
            self.join(k, self._cut(out, k).view(torch.int32))
        return out

    def load(self, values: torch.Tensor) -> None:
        """Store a whole fp32 master shard (any device): the params' shard becomes its rounding."""
        values = values.to(device=self.param.device, dtype=torch.float32).contiguous()
        for k in range(self.num_chunks):
            chunk = self._cut(values, k)
            self.split(k, chunk, chunk.view(torch.int32))

    def reset(self) -> None:
        """Make the master equal the bf16 params (residual zero)."""
        self.residual.zero_()
        self._down_ties = [None] * self.num_chunks


def resolve_master_weights(option: str, dtype: torch.dtype, names: list[str]) -> str:
    """``"split"`` or ``"fp32"`` for a bucket of ``dtype`` params (``names`` for the warning).

    ``"auto"`` keeps 4-byte fp32 masters (the split form measured slower on CPU: see
    docs/mixed-precision.md). ``"split"`` applies to bf16 params; fp16 params keep fp32 masters
    with one warning (see [Note: split masters]), and fp32/fp64 params need no master at all.
    """
    if option == "split" and dtype == torch.bfloat16:
        return "split"
    if option == "split" and dtype == torch.float16:
        warnings.warn(f"master_weights='split' applies to bf16 params only; the fp16 params "
                      f"{names[:3]}{'...' if len(names) > 3 else ''} keep 4-byte fp32 masters (an fp16 "
                      "value plus 16 bits cannot hold every fp32 master)", RuntimeWarning, stacklevel=5)
    return "fp32"

"""Channel-wise linear quantisation of expert weights to int8 / int4 / int2 (packed).

Each output channel (row) of a weight matrix (N, K) gets its own affine grid: with
lo = min(row), hi = max(row) and levels = 2**bits - 1,
    scale = (hi - lo) / levels,   q = round((w - lo) / scale) in [0, levels],   w' = lo + q * scale,
so every weight is reproduced within scale / 2 of its value (the bound tests check). int4 and int2
codes are packed 2 and 4 to a byte along K (K padded to a whole byte), so an int4 expert takes
about 1/8 and an int2 expert about 1/16 of its float32 bytes, plus 8 bytes per row for scale/lo.

Bitwidth 32 means "not quantised": the tensor is kept as it is (float32 or whatever dtype it has).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["QUANT_BITS", "QuantizedTensor", "quantize", "dequantize", "fake_quantize", "bits_label"]

QUANT_BITS = (8, 4, 2)  # quantised bitwidths; 32 = unquantised
FLOAT_BITS = 32


def bits_label(bits: int) -> str:
    """The manifest's dtype name of a bitwidth ('float32', 'int8', 'int4', 'int2')."""
    return "float32" if bits == FLOAT_BITS else f"int{bits}"


def _check_bits(bits: int) -> None:
    if bits not in QUANT_BITS:
        raise ValueError(f"bitwidth {bits} is not supported; quantised bitwidths are {QUANT_BITS} (32 = unquantised)")


@dataclass
class QuantizedTensor:
    """A (N, K) matrix as packed codes (N, ceil(K * bits / 8)) uint8 + per-row scale and lo (N, 1)."""

    codes: Tensor  # (N, packed K) uint8
    scale: Tensor  # (N, 1) float32
    lo: Tensor  # (N, 1) float32
    bits: int
    shape: tuple[int, int]  # (N, K) of the original matrix

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.lo))


def _pack(q: Tensor, bits: int) -> Tensor:
    """(N, K) uint8 codes < 2**bits -> (N, ceil(K / per_byte)) uint8, first code in the low bits."""
    per_byte = 8 // bits
    if per_byte == 1:
        return q
    n, k = q.shape
    pad = (-k) % per_byte
    if pad:
        q = torch.cat([q, q.new_zeros(n, pad)], dim=1)
    q = q.view(n, -1, per_byte)  # (N, bytes, per_byte)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=q.device)  # (per_byte,)
    return (q << shifts).sum(dim=-1, dtype=torch.uint8)  # disjoint bit fields: the sum is an OR


def _unpack(codes: Tensor, bits: int, k: int) -> Tensor:
    """Inverse of `_pack`: (N, bytes) uint8 -> (N, K) uint8 codes."""
    per_byte = 8 // bits
    if per_byte == 1:
        return codes
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    mask = (1 << bits) - 1
    q = (codes[:, :, None] >> shifts) & mask  # (N, bytes, per_byte)
    return q.reshape(codes.shape[0], -1)[:, :k]


def quantize(weight: Tensor, bits: int) -> QuantizedTensor:
    """Channel-wise (per row) affine quantisation of a (N, K) matrix to `bits` in (8, 4, 2)."""
    _check_bits(bits)
    if weight.dim() != 2:
        raise ValueError(f"quantize expects a (N, K) matrix, got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    levels = (1 << bits) - 1
    lo = w.amin(dim=1, keepdim=True)  # (N, 1)
    hi = w.amax(dim=1, keepdim=True)
    # a constant row has hi == lo: any positive scale reproduces it exactly (q = 0)
    scale = ((hi - lo) / levels).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round((w - lo) / scale).clamp_(0, levels).to(torch.uint8)  # (N, K)
    return QuantizedTensor(_pack(q, bits), scale, lo, bits, (w.shape[0], w.shape[1]))


DEQUANTIZE_BLOCK_ELEMENTS = 1 << 18  # rows are dequantised in blocks of about this many weights


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.float32, out: Tensor | None = None) -> Tensor:
    """QuantizedTensor -> (N, K) `dtype` matrix (written into `out` when given).

    Works through blocks of rows so the unpacked codes are small temporaries (a few hundred KiB,
    reused by the allocator) instead of expert-sized ones: those stayed resident in the
    offloader's process (allocator retention) and cost page faults on every load.
    """
    if out is None:
        out = torch.empty(qt.shape, dtype=dtype, device=qt.codes.device)
    rows = max(1, DEQUANTIZE_BLOCK_ELEMENTS // max(qt.shape[1], 1))
    for start in range(0, qt.shape[0], rows):
        block = slice(start, start + rows)
        q = _unpack(qt.codes[block], qt.bits, qt.shape[1])  # (rows, K) uint8
        scale, lo, target = qt.scale[block], qt.lo[block], out[block]
        if target.dtype == torch.float32:
            # q * scale written straight into out (uint8 x float32 promotes to float32), then + lo:
            # two passes over the output and no float copy of the codes (2-2.5x faster than addcmul
            # on a float copy for int4/int2 on CPU)
            torch.mul(q, scale, out=target)
            target.add_(lo)
        else:
            target.copy_(q * scale + lo)  # in float32, then cast once
    return out


def fake_quantize(weight: Tensor, bits: int) -> Tensor:
    """quantize -> dequantize in the weight's dtype (bits 32: the weight itself)."""
    if bits == FLOAT_BITS:
        return weight
    return dequantize(quantize(weight, bits), weight.dtype)

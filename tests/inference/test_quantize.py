"""Channel-wise quantisation: per-row error bounds per bitwidth, packing, exact cases."""

from __future__ import annotations

import pytest
import torch

from lightning_moe.inference.quantize import dequantize, fake_quantize, quantize


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_quantise_dequantise_error_is_within_half_a_step_per_row(bits):
    w = torch.randn(48, 67) * torch.logspace(-2, 1, 48)[:, None]  # rows of very different ranges, odd K
    q = quantize(w, bits)
    back = dequantize(q)
    # the bound from the row's own range, computed here in float64 independently of the scale stored
    w64 = w.double()
    step = (w64.amax(1) - w64.amin(1)) / (2**bits - 1)  # (N,)
    err = (back.double() - w64).abs().amax(1)
    assert torch.all(err <= step / 2 * (1 + 1e-5) + 1e-7)
    # the grid is used: the error is not trivially zero, and it shrinks as bits grow
    assert err.max() > 0


def test_error_shrinks_with_bits_and_packed_bytes_match_the_bitwidth():
    w = torch.randn(32, 64)
    errors = {b: (fake_quantize(w, b) - w).abs().mean().item() for b in (8, 4, 2)}
    assert errors[8] < errors[4] < errors[2]
    for bits in (8, 4, 2):
        q = quantize(w, bits)
        assert q.codes.dtype == torch.uint8 and q.codes.shape == (32, 64 * bits // 8)
    assert fake_quantize(w, 32) is w  # 32 = not quantised


def test_constant_rows_and_exact_grid_values_round_trip_exactly():
    w = torch.tensor([[0.5] * 5, [0.0, 1.0, 2.0, 3.0, 1.0]])  # a constant row; a row on the int2 grid
    assert torch.equal(dequantize(quantize(w, 2)), w)


def test_unsupported_bitwidth_is_refused():
    with pytest.raises(ValueError, match="bitwidth 3"):
        quantize(torch.randn(2, 2), 3)

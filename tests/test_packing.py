"""Packed MX storage: unpack(pack(x)) equals quantize_mx(x) bit for bit, for every format."""

from __future__ import annotations

import pytest
import torch
from test_numerics import assert_bits_equal

from lm_eval_mx.numerics.formats import FORMATS
from lm_eval_mx.numerics.packing import code_table, pack_mx, unpack_mx
from lm_eval_mx.numerics.quantize import quantize_mx


def _data(shape, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * torch.exp2(torch.randint(-30, 30, shape[:-1], generator=g)).unsqueeze(-1)
    x.view(-1)[::97] = 0.0
    flat = x.view(-1, shape[-1])
    flat[0, 3] = float("inf")  # a NaN block
    flat[1, :] = 1e-41  # a tiny block (the 2**-127 scale)
    flat[2, 5] = float("nan")
    return x


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("block", [32, 16, 0])
@pytest.mark.parametrize("k", [128, 100])
@pytest.mark.parametrize("rounding", ["even", "nearest", "floor"])
def test_round_trip_is_fake_quantization(fmt, block, k, rounding):
    x = _data((4, 6, k))
    packed = pack_mx(x, fmt, block, rounding=rounding)
    assert packed.codes.dtype == torch.uint8 and packed.scales.dtype == torch.uint8
    assert_bits_equal(unpack_mx(packed), quantize_mx(x, fmt, block, rounding=rounding).numpy())


@pytest.mark.parametrize("mode", ["ceil", "even", "rceil"])
def test_round_trip_scale_modes_and_bf16(mode):
    x = _data((8, 64)).to(torch.bfloat16)
    packed = pack_mx(x, "fp4_e2m1", 32, scale_mode=mode)
    out = unpack_mx(packed, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert_bits_equal(out, quantize_mx(x, "fp4_e2m1", 32, scale_mode=mode).float().numpy())


def test_storage_size():
    w = torch.randn(256, 4096)
    bf16 = w.numel() * 2
    assert pack_mx(w, "fp8_e4m3").nbytes / bf16 == pytest.approx((1 + 1 / 32) / 2)   # 0.516
    assert pack_mx(w, "fp4_e2m1").nbytes / bf16 == pytest.approx((0.5 + 1 / 32) / 2)  # 0.266
    assert pack_mx(w, "int2").nbytes / bf16 == pytest.approx((0.25 + 1 / 32) / 2)


def test_bad_arguments():
    with pytest.raises(ValueError, match="scale_bits"):
        pack_mx(torch.ones(4, 32), "fp8", scale_bits=9)
    with pytest.raises(ValueError, match="block_size"):
        pack_mx(torch.ones(4, 32), "fp8", block_size=-1)


def test_code_tables_are_the_format_grids():
    for fmt in FORMATS.values():
        t = code_table(fmt)
        finite = t[torch.isfinite(t)]
        assert finite.abs().max() == fmt.max_normal
        smallest = 2.0**-fmt.mbits if fmt.is_int else fmt.min_subnormal
        assert finite[finite > 0].min() == smallest
        # with max_normal in the block the scale is 1, so every code's value is a fixed point
        grid = finite.unique().view(1, -1)
        assert torch.equal(quantize_mx(grid, fmt, 0), grid)

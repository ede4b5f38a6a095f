"""E4M3 block scales (NVFP4): docs/numerics.md's step-by-step definition, checked against an independent numpy
implementation (grids by enumeration), against torchao 0.18 on ordinary data, and on edge data where
the two are documented to differ. Packing round trips and scheme reporting."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lm_eval_mx.numerics.formats import FORMATS, NAMED_SCHEMES
from lm_eval_mx.numerics.packing import pack, unpack_mx
from lm_eval_mx.numerics.quantize import make_scheme, quantize

NV = NAMED_SCHEMES["nvfp4"]
SINGLE = make_scheme("fp4_e2m1", 16, scale_format="e4m3")


def _grid(name: str) -> np.ndarray:
    """Every non-negative value of a float format, by enumeration of (exponent, mantissa), ascending."""
    fmt = FORMATS[name]
    vals = [m * 2.0 ** (fmt.emin - fmt.mbits) for m in range(2**fmt.mbits)]
    vals += [(1 + m / 2**fmt.mbits) * 2.0**e for e in range(fmt.emin, fmt.emax + 1) for m in range(2**fmt.mbits)]
    return np.array(sorted(v for v in set(vals) if v <= fmt.max_normal), dtype=np.float64)


def _round_to(grid: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Nearest grid value to |v| (ties to the even index, i.e. the even mantissa), saturating; sign kept."""
    a = np.minimum(np.abs(v.astype(np.float64)), grid[-1])
    i = np.clip(np.searchsorted(grid, a), 1, len(grid) - 1)
    lo, hi = grid[i - 1], grid[i]
    pick_hi = (a - lo > hi - a) | ((a - lo == hi - a) & (i % 2 == 0))
    return (np.where(pick_hi, hi, lo) * np.sign(v)).astype(np.float32)


E4M3_GRID, FP4_GRID = _grid("fp8_e4m3"), _grid("fp4_e2m1")


def numpy_reference(x: np.ndarray, block: int = 16, two_level: bool = True) -> np.ndarray:
    """docs/numerics.md's NVFP4 steps, one float32 operation each, on finite input whose rows are whole blocks."""
    f32 = np.float32
    x = x.astype(f32)
    ts = f32(np.abs(x).max()) / f32(448 * 6) if two_level else f32(1)
    if two_level and ts < f32(2.0**-126):
        ts = f32(1)
    out = np.zeros_like(x)
    for r in range(x.shape[0]):
        for b0 in range(0, x.shape[1], block):
            xb = x[r, b0 : b0 + block]
            s = f32(np.abs(xb).max()) / f32(6)
            if two_level:
                s = s / ts
            s8 = _round_to(E4M3_GRID, np.array([s], dtype=f32))[0]
            if s8 == 0:
                continue  # a scale that rounds to zero: a zero block
            recip = (f32(1) / ts) / s8 if two_level else f32(1) / s8
            q = _round_to(FP4_GRID, xb * recip)
            out[r, b0 : b0 + block] = q * (ts * s8 if two_level else s8)
    return out + f32(0)


def _data(seed: int, rows: int = 24, cols: int = 64, spread: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) * torch.logspace(-spread, spread, rows).unsqueeze(1)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("two_level", [True, False])
def test_matches_the_step_by_step_definition(seed, two_level):
    """Including tiny blocks, whose E4M3 scales are subnormal (2**-9 .. 2**-6) or round to zero."""
    x = _data(seed, spread=6.0)
    x[0, :16] = 0.0
    got = quantize(x, NV if two_level else SINGLE)
    want = numpy_reference(x.numpy(), two_level=two_level)
    assert np.array_equal(got.numpy().view(np.uint32), want.view(np.uint32))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=16, max_size=16 * 6),
       st.booleans())
def test_definition_property(values, two_level):
    n = len(values) // 16 * 16
    x = torch.tensor(values[:n], dtype=torch.float32).view(-1, 16)
    got = quantize(x, NV if two_level else SINGLE).numpy()
    assert np.array_equal(got.view(np.uint32), numpy_reference(x.numpy(), two_level=two_level).view(np.uint32))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=1, max_size=90),
       st.sampled_from([NV, SINGLE, make_scheme("fp8_e4m3", 32, scale_format="e4m3", tensor_scale="amax"),
                        make_scheme("int4", 8, "nearest", scale_format="e4m3", tensor_scale="amax")]))
def test_packed_storage_round_trips_exactly(values, scheme):
    """unpack(pack(x)) is the fake-quantized x, bit for bit; ragged rows included."""
    x = torch.tensor(values, dtype=torch.float32).view(1, -1)
    p = pack(x, scheme)
    assert p.scales.dtype == torch.uint8 and (p.tensor_scale is not None) == (scheme.tensor_scale.value == "amax")
    got, want = unpack_mx(p), quantize(x, scheme)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())


def test_packed_nvfp4_bytes():
    w = torch.randn(256, 512)
    p = pack(w, NV)
    assert p.nbytes == 256 * 512 // 2 + 256 * 512 // 16 + 4  # codes, E4M3 scales, one float32 tensor scale
    assert p.nbytes / (w.numel() * 2) < 0.29  # vs bf16


def test_non_finite_and_zero_tensors():
    x = _data(0)[:4]
    bad = x.clone()
    bad[1, 3] = float("inf")
    assert quantize(bad, NV).isnan().all()  # one inf spoils the tensor scale: every value NaN
    single = quantize(bad, SINGLE)  # without a tensor scale, only the block holding it
    assert single[1, :16].isnan().all() and not single[0].isnan().any() and not single[1, 16:].isnan().any()
    assert torch.equal(quantize(torch.zeros(4, 32), NV), torch.zeros(4, 32))
    nan = x.clone()
    nan[2, 40] = float("nan")
    assert quantize(nan, NV).isnan().all()


def _torchao():
    if os.environ.get("CI") and not _has_torchao():
        pytest.fail("torchao (a test dependency of the [test] extra) is missing in CI")
    return pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor", reason="torchao not installed")


def _has_torchao() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchao") is not None


def _ao_dequant(x: torch.Tensor, two_level: bool) -> torch.Tensor:
    nv = _torchao()
    ts = nv.per_tensor_amax_to_scale(x.float().abs().amax()) if two_level else None
    return nv.NVFP4Tensor.to_nvfp4(x, 16, per_tensor_scale=ts).dequantize(x.dtype)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.float() + 0.0, b.float() + 0.0  # torchao returns -0.0 where we return +0.0
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("magnitude", [1e-3, 1.0, 1e3])
@pytest.mark.parametrize("seed", range(3))
def test_nvfp4_matches_torchao(dtype, magnitude, seed):
    """Bit-exact with torchao's NVFP4 (per-tensor amax scale, block 16) on ordinary data."""
    x = (_data(seed, 32, 128) * magnitude).to(dtype)
    assert _same(quantize(x, NV), _ao_dequant(x, True))
    assert _same(quantize(x.view(4, 8, 128), NV), _ao_dequant(x, True).view(4, 8, 128))  # any rank


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_level_matches_torchao_above_its_scale_clamp(dtype):
    """Without a tensor scale, equal to torchao wherever block scales stay >= 2**-6 (block max >= 0.09375)."""
    x = (_data(5, 32, 128, spread=1.0) * 30).to(dtype)
    assert (x.float().view(32, 8, 16).abs().amax(-1) / 6 >= 2.0**-6).all()
    assert _same(quantize(x, SINGLE), _ao_dequant(x, False))


def test_documented_deviations_from_torchao():
    """Each deviation docs/numerics.md lists, pinned: where it differs, and that we give the documented result."""
    x = _data(1, 4, 64, spread=0.5)
    # 1. E4M3 scales below 2**-6: torchao clamps them up to 2**-6; we keep E4M3 subnormals.
    tiny = x.clone()
    tiny[0, :16] *= 2.0**-14  # (block max / 6) / tensor scale in [2**-9, 2**-6): an E4M3 subnormal scale
    ours, ao = quantize(tiny, NV), _ao_dequant(tiny, True)
    assert torch.equal(ours[1:], ao[1:]) and not torch.equal(ours[0, :16], ao[0, :16])
    assert np.array_equal(ours.numpy(), numpy_reference(tiny.numpy()))
    assert (ours[0, :16] != 0).sum() > (ao[0, :16] != 0).sum()  # finer scale: fewer values flushed to zero
    # 2. an all-zero tensor: torchao divides by a zero tensor scale (NaN); we return zeros.
    zeros = torch.zeros(2, 32)
    assert _ao_dequant(zeros, True).isnan().all() and torch.equal(quantize(zeros, NV), zeros)
    # 3. single level, a block holding inf: torchao saturates it; we make the block NaN (as OCP MX does).
    inf = x.clone()
    inf[0, 3] = float("inf")
    assert not _ao_dequant(inf, False)[0, :16].isnan().all() and quantize(inf, SINGLE)[0, :16].isnan().all()

"""MX numerics: every golden case bit-exact, plus properties independent of the golden file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from lm_eval_mx.numerics.formats import ALIASES, FORMATS, get_format
from lm_eval_mx.numerics.quantize import quantize_mx

GOLDEN = Path(__file__).parent / "data" / "microxcaling_mx_golden.npz"
_DATA = np.load(GOLDEN)
CASES = json.loads(bytes(_DATA["index_json"]).decode())


def assert_bits_equal(out: torch.Tensor, expected: np.ndarray, zeros_either_sign: bool = False) -> None:
    got = out.float().cpu().numpy()
    nan_g, nan_e = np.isnan(got), np.isnan(expected)
    assert np.array_equal(nan_g, nan_e), f"NaN pattern differs at {np.argwhere(nan_g != nan_e)[:5].tolist()}"
    g, e = got[~nan_g], expected[~nan_e]
    if zeros_either_sign:
        g, e = g + 0.0, e + 0.0
    bad = g.view(np.uint32) != e.view(np.uint32)
    assert not bad.any(), f"{bad.sum()} elements differ, e.g. got {g[bad][:4]} expected {e[bad][:4]}"


def run_golden(case: dict, device: str, backend=None) -> None:
    x = torch.from_numpy(_DATA[case["input"]]).to(device)
    if case["dtype"] == "bfloat16":
        x = x.to(torch.bfloat16)
    args = (case["elem_format"], case["block_size"], case["axis"], case["round"], case["scale_bits"])
    out = quantize_mx(x, *args) if backend is None else backend(x, *args)
    assert out.dtype == x.dtype
    assert_bits_equal(out, _DATA[case["key"]])


def test_golden_file_complete():
    assert len(CASES) == 1128


@pytest.mark.parametrize("case", CASES, ids=[c["key"] for c in CASES])
def test_golden_cpu(case):
    run_golden(case, "cpu")


def test_float16_follows_bfloat16_rules():
    """float16 inputs: same results as computing in float32 (docs/numerics.md: the cast back never rounds)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 96, generator=g) * 4).to(torch.float16)
    for fmt in FORMATS:
        ref = quantize_mx(x.float(), fmt)
        out = quantize_mx(x, fmt)
        assert out.dtype == torch.float16
        assert torch.equal(out.float(), ref)


def test_aliases_and_errors():
    assert get_format("MXFP4").name == "fp4_e2m1"
    assert get_format("e4m3").name == "fp8_e4m3"
    assert get_format("mxint8").name == "int8"
    assert all(get_format(a).name == n for a, n in ALIASES.items())
    with pytest.raises(ValueError, match="valid formats: fp4_e2m1, fp6_e2m3"):
        get_format("fp5")
    with pytest.raises(ValueError, match="rounding"):
        quantize_mx(torch.ones(4), "fp8", rounding="up")
    with pytest.raises(ValueError, match="block_size"):
        quantize_mx(torch.ones(4), "fp8", block_size=-1)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        quantize_mx(torch.ones(4, dtype=torch.float64), "fp8")


def _representable(fmt) -> torch.Tensor:
    """Every non-negative value of an element format, by enumeration."""
    vals = {0.0}
    if fmt.is_int:
        vals |= {k * 2.0**-fmt.mbits for k in range(int(fmt.max_normal * 2**fmt.mbits) + 1)}
    else:
        for e in range(fmt.emin, fmt.emax + 1):
            for m in range(2**fmt.mbits):
                vals.add((1 + m / 2**fmt.mbits) * 2.0**e)
        vals |= {m * 2.0 ** (fmt.emin - fmt.mbits) for m in range(2**fmt.mbits)}
    return torch.tensor(sorted(v for v in vals if v <= fmt.max_normal), dtype=torch.float64)


finite = st.floats(-1e6, 1e6, allow_nan=False, width=32)
fmt_names = st.sampled_from(sorted(FORMATS))
roundings = st.sampled_from(["nearest", "even", "floor"])
scale_modes = st.sampled_from(["floor", "ceil", "even", "rceil"])


def _tensor(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


@settings(max_examples=150, deadline=None)
@given(st.lists(finite, min_size=1, max_size=80), fmt_names, roundings, st.sampled_from([0, 8, 32]), scale_modes)
def test_idempotent(values, fmt, rounding, block, mode):
    x = _tensor(values)
    q = quantize_mx(x, fmt, block, rounding=rounding, scale_mode=mode)
    assert torch.equal(quantize_mx(q, fmt, block, rounding=rounding, scale_mode=mode), q)


def _scaling_is_exact(x: torch.Tensor, fmt_name: str, k: int, block: int = 32) -> bool:
    """True where quantize(x * 2**k) == quantize(x) * 2**k must hold: x * 2**k is exact in float32, and in
    every block (not just the tensor) both shared exponents, floor(log2 max|x|) - emax and that plus k,
    stay inside E8M0's [-127, 127] (at the clamp, scaling changes which values survive)."""
    if not torch.equal(x * 2.0**k * 2.0**-k, x):  # x * 2**k underflowed (or overflowed) and was rounded
        return False
    emax = get_format(fmt_name).emax
    padded = torch.nn.functional.pad(x, (0, (-len(x)) % block)).view(-1, block)
    for amax in padded.abs().amax(1).tolist():
        if amax == 0:
            continue
        exp = math.frexp(amax)[1] - 1 - emax  # floor(log2(amax)) - emax, exact for float32 values
        if exp + min(k, 0) < -127 or exp + max(k, 0) > 127:
            return False
    return True


@settings(max_examples=150, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=64), fmt_names, roundings,
       st.integers(-60, 60))
def test_power_of_two_scaling_is_exact(values, fmt, rounding, k):
    x = _tensor(values)
    assume(_scaling_is_exact(x, fmt, k))
    q = quantize_mx(x, fmt, 32, rounding=rounding)
    assert torch.equal(quantize_mx(x * 2.0**k, fmt, 32, rounding=rounding), q * 2.0**k)


def test_power_of_two_scaling_precondition_is_per_block():
    """Regression: the tensor maximum (1.0) is far from the clamp, but the second block's (2**-62) is not:
    scaled by 2**-60 its shared exponent would be -130, clamped to -127, and 1.25 * 2**-76 changes value."""
    x = _tensor([1.0] * 32 + [2.0**-62, 1.25 * 2.0**-76])
    q = quantize_mx(x, "fp8_e4m3", 32)
    assert not _scaling_is_exact(x, "fp8_e4m3", -60)
    assert not torch.equal(quantize_mx(x * 2.0**-60, "fp8_e4m3", 32), q * 2.0**-60)
    for k in (-57, 0, 60):  # the second block's exponent -70 + k stays >= -127
        assert _scaling_is_exact(x, "fp8_e4m3", k)
        assert torch.equal(quantize_mx(x * 2.0**k, "fp8_e4m3", 32), q * 2.0**k)


@settings(max_examples=150, deadline=None)
@given(st.lists(finite, min_size=1, max_size=64), fmt_names, roundings, st.sampled_from([8, 32]))
def test_outputs_are_representable_and_close(values, fmt_name, rounding, block):
    fmt = get_format(fmt_name)
    x = _tensor(values)
    q = quantize_mx(x, fmt, block, rounding=rounding)
    grid = _representable(fmt)
    xb = torch.nn.functional.pad(x, (0, (-len(x)) % block)).view(-1, block).double()
    qb = torch.nn.functional.pad(q, (0, (-len(q)) % block)).view(-1, block).double()
    for xr, qr in zip(xb, qb):
        amax = xr.abs().max().item()
        if amax == 0:
            assert (qr == 0).all()
            continue
        scale = 2.0 ** max(int(np.floor(np.log2(amax))) - fmt.emax, -127)
        elems = (qr.abs() / scale)
        assert torch.isin(elems, grid).all(), f"{elems} not all in the {fmt.name} grid"
        if rounding != "floor":
            # |error| <= half an ulp of the element grid, except where the value saturated
            nxt = torch.searchsorted(grid, (xr.abs() / scale).clamp(max=fmt.max_normal))
            lo = grid[(nxt - 1).clamp(min=0)]
            hi = grid[nxt.clamp(max=len(grid) - 1)]
            half_ulp = (hi - lo).clamp(min=0) / 2
            err = (xr.abs() / scale).clamp(max=fmt.max_normal) - elems
            assert (err.abs() <= half_ulp + 0).all()


def test_specials():
    x = torch.tensor([1.0, float("inf"), 2.0, 3.0, 0.5, -0.0, -1e-30, 4.0])
    q = quantize_mx(x, "fp8", 4)
    assert q[:4].isnan().all() and not q[4:].isnan().any()
    z = quantize_mx(torch.tensor([-1e-30, 1.0]), "fp4", 2)  # negative tiny value rounds to +0
    assert z[0].item() == 0.0 and not torch.signbit(z[0])


@pytest.mark.parametrize("mode", ["floor", "ceil", "even", "rceil"])
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1"])
def test_scale_modes_match_torchao(mode, fmt):
    """Cross-check the non-OCP scale modes against torchao where it can express the case."""
    mx_tensor = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor", reason="torchao not installed")
    from torchao.prototype.mx_formats.config import ScaleCalculationMode

    dtypes = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2, "fp6_e3m2": "fp6_e3m2",
              "fp6_e2m3": "fp6_e2m3", "fp4_e2m1": torch.float4_e2m1fn_x2}
    g = torch.Generator().manual_seed(1)
    # normal range, no inf/nan and no tiny blocks: where torchao follows OCP semantics
    x = torch.randn(16, 128, generator=g) * torch.logspace(-3, 3, 16).unsqueeze(1)
    mode_enum = ScaleCalculationMode(mode)
    t = mx_tensor.MXTensor.to_mx(x, dtypes[fmt], 32, scaling_mode=mode_enum)
    ref = t.dequantize(torch.float32)
    assert torch.equal(quantize_mx(x, fmt, 32, rounding="even", scale_mode=mode), ref)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_tiny_block_deviations_from_torchao(fmt):
    """docs/numerics.md, *MX (E8M0 scales)*: where a block's E8M0 scale clamps at 2**-127, torchao dequantizes to half the OCP
    value with scale_mode floor/ceil/even and to zero with rceil; one power of ten above, both agree."""
    mx_tensor = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor", reason="torchao not installed")
    from torchao.prototype.mx_formats.config import ScaleCalculationMode

    dtype = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}[fmt]
    g = torch.Generator().manual_seed(0)
    x = (1 + torch.rand(4, 32, generator=g)) * torch.randn(4, 32, generator=g).sign()  # magnitudes in [1, 2)
    tiny = x * 1e-37  # float32 normals; floor(log2 max) - emax < -127, so the scale clamps at 2**-127
    assert tiny.abs().min() > 2.0**-126
    for mode in ("floor", "ceil", "even", "rceil"):
        def torchao(t, mode=mode):
            return mx_tensor.MXTensor.to_mx(t, dtype, 32, scaling_mode=ScaleCalculationMode(mode)).dequantize(
                torch.float32)

        ours = quantize_mx(tiny, fmt, 32, rounding="even", scale_mode=mode)
        assert (ours != 0).all(), mode
        assert torch.equal(torchao(tiny), ours * (0.0 if mode == "rceil" else 0.5)), mode
        normal = x * 1e-30
        assert torch.equal(torchao(normal), quantize_mx(normal, fmt, 32, rounding="even", scale_mode=mode)), mode

"""Fake quantization in plain torch: the exact reference every backend must match.

MX (E8M0 scales) follows microxcaling's CUDA path (see tests/data/README.md): the
shared exponent comes from the float32 exponent bits of the block maximum, elements
round with subnormals kept and saturate to the format's max normal, blocks holding
inf/nan become NaN, zeros come back as +0.0. All of it is float32 arithmetic with
power-of-two factors, so every step is exact.

E4M3 scales (NVFP4) follow torchao's ``nvfp4_quantize`` arithmetic, with the deviations the
docs/numerics.md lists (E4M3 subnormal scales kept, all-zero and non-finite tensors): every division is
one correctly rounded float32 operation, so the result is defined to the bit and the Triton
kernel reproduces it.

The code runs unchanged on CPU and CUDA (and under ``torch.compile``).
"""

from __future__ import annotations

import torch

from .formats import (
    E4M3,
    E4M3Steps,
    ElemFormat,
    Rounding,
    ScaleFormat,
    ScaleMode,
    Scheme,
    TensorScale,
    get_format,
    get_rounding,
    get_scale_format,
    get_scale_mode,
    get_tensor_scale,
)
from .rotation import Rotation, rotate

_F32_MANT = 23
_F32_BIAS = 127
_F32_NAN_BITS = 0x7FC00000
_F32_SUBNORMAL_2_M127 = 0x00400000  # 2**-127, the smallest E8M0 scale
_F32_MIN_NORMAL = 2.0**-126


def pow2(e: torch.Tensor) -> torch.Tensor:
    """Exact float32 ``2**e`` for int32 ``e`` in [-127, 127] (2**-127 is subnormal)."""
    bits = torch.where(e > -_F32_BIAS, (e + _F32_BIAS) << _F32_MANT, _F32_SUBNORMAL_2_M127)
    return bits.to(torch.int32).view(torch.float32)  # explicit: inductor may widen the scalar


def _biased_exponent(x: torch.Tensor) -> torch.Tensor:
    return (x.view(torch.int32) >> _F32_MANT) & 0xFF


def log2_exponent(amax: torch.Tensor, fmt: ElemFormat, ceil: bool = False) -> torch.Tensor:
    """auto-round 0.16.1's shared exponent (``auto_round/data_type/mxfp.py: quant_mx``), int32: ``floor(torch.log2(
    amax))`` in float32 (``amax == 0``: ``log2`` read as 1) minus the element's emax, clamped to [-127, 127] (a scale
    above 2**127 clamped, not NaN). ``scale_mode=log2`` and :func:`lm_eval_mx.numerics.runtimes.autoround_mx` (a
    shipped auto-round checkpoint's activations) both take it from here; it is also AMD Quark 0.13's
    ``scale_calculation_mode: floor`` (``fake_quantize_mx``), and with ``ceil`` (``torch.ceil`` for ``torch.floor``)
    Quark's ``ceil`` (``scale_mode=log2_ceil``)."""
    e = torch.where(amax == 0, torch.ones_like(amax), torch.log2(amax))
    e = torch.ceil(e) if ceil else torch.floor(e)
    return (e - fmt.emax).clamp(-127, 127).to(torch.int32)


def shared_exponent(
    amax: torch.Tensor, fmt: ElemFormat, scale_bits: int, scale_mode: ScaleMode
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unbiased shared E8M0 exponent (int32, clamped) and a mask of NaN blocks.

    ``amax`` is the float32 block maximum of |x| (NaN/inf propagate into the mask).
    """
    bits = amax.view(torch.int32)
    if scale_mode is ScaleMode.RCEIL:
        descale = amax * (1.0 / fmt.max_normal)  # float32 product, as cuBLAS/torchao compute it
        dbits = descale.view(torch.int32)
        biased = (dbits >> _F32_MANT) & 0xFF
        mant = dbits & 0x7FFFFF
        round_up = torch.where(biased == 0, mant > 0x400000, mant != 0)
        exp = biased + round_up.to(torch.int32) - _F32_BIAS
    elif scale_mode in (ScaleMode.LOG2, ScaleMode.LOG2_CEIL):
        exp = log2_exponent(amax, fmt, ceil=scale_mode is ScaleMode.LOG2_CEIL)
    else:
        if scale_mode is ScaleMode.EVEN:
            bits = (bits + (1 << (_F32_MANT - fmt.mbits - 1))) & 0x7F800000
        exp = ((bits >> _F32_MANT) & 0xFF) - _F32_BIAS - fmt.emax
        if scale_mode is ScaleMode.CEIL:
            exp = exp + ((amax.view(torch.int32) & 0x7FFFFF) != 0).to(torch.int32)
    scale_emax = 2 ** (scale_bits - 1) - 1
    nan = ~torch.isfinite(amax) | (exp > scale_emax)
    return exp.clamp(-scale_emax, scale_emax), nan


def round_elements(v: torch.Tensor, fmt: ElemFormat, rounding: Rounding) -> torch.Tensor:
    """Round float32 ``v`` (already divided by the block scale) to ``fmt``, saturating."""
    # Private exponent of each element, floored at the format's smallest normal.
    p = (_biased_exponent(v) - _F32_BIAS).clamp(min=fmt.emin) - fmt.mbits
    t = v * pow2(-p)  # exact: |t| < 2**(mbits + 2)
    if rounding is Rounding.EVEN:
        r = torch.round(t)
    elif rounding is Rounding.NEAREST:
        a = t.abs()
        f = torch.floor(a)
        r = (f + (a - f >= 0.5).to(a.dtype)).copysign(t)  # a - f is exact; a + 0.5 is not
    else:
        r = torch.trunc(t)
    q = r * pow2(p)
    return q.clamp(-fmt.max_normal, fmt.max_normal)


def tensor_scale(amax: torch.Tensor, fmt: ElemFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-tensor scale, its reciprocal) from a float32 tensor maximum: ``amax / (448 · max_normal)``.

    A scale below float32's smallest normal (an all-zero or near-zero tensor) is replaced by 1,
    so that its reciprocal is finite; such a tensor quantizes to zeros.
    """
    ts = amax / amax.new_full((), E4M3.max_normal * fmt.max_normal)  # a tensor divisor: see e4m3_block_scales
    ts = torch.where(ts >= _F32_MIN_NORMAL, ts, torch.ones_like(ts))
    return ts, 1.0 / ts


def static_tensor_scale(scale: float, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-tensor scale, its reciprocal) of ``tensor_scale=static``: the given float32 value ``ts`` (a
    divisor, as :func:`tensor_scale` returns one: ``ts = calibrated amax / (448 · max_normal)``) and
    ``1/ts`` rounded to float32. It must be finite and positive: a stored scale is checked when it is read."""
    ts = torch.tensor(float(scale), dtype=torch.float32, device=device)
    if not (torch.isfinite(ts) and ts > 0):
        raise ValueError(f"a static per-tensor scale must be finite and > 0, got {scale!r}")
    return ts, 1.0 / ts


def e4m3_block_scales(amax: torch.Tensor, fmt: ElemFormat, ts: torch.Tensor | None, clamp: bool = False) -> torch.Tensor:
    """Block scales as E4M3 values (float32): ``(amax / max_normal) / ts`` rounded to nearest-even
    E4M3, subnormals kept, saturating at 448; ``clamp``: first clamped to [2**-6, 448], E4M3's normal range
    (torchao's ``nvfp4_quantize``: no subnormal scale, no zero scale)."""
    # Divided by a tensor, not a Python number: CUDA torch turns division by a number into multiplication by
    # its reciprocal (rounded twice); by a tensor it divides, correctly rounded, as the CPU and the kernel do.
    s = amax / amax.new_full((), fmt.max_normal)
    if ts is not None:
        s = s / ts
    if clamp:
        s = s.clamp(2.0**E4M3.emin, E4M3.max_normal)
    return round_elements(s, E4M3, Rounding.EVEN)


# The E4M3 step orders whose elements are divided by their scale (round_on_scales).
_DIVIDING = (E4M3Steps.DIVIDE, E4M3Steps.QUARK)
# compressed-tensors' stand-in for a zero E4M3 scale (``_get_dtype_eps(float8_e4m3fn)``).
_CT_ZERO_SCALE = 0.125


def rcp_ftz(x: torch.Tensor) -> torch.Tensor:
    """PTX ``rcp.approx.ftz.f32`` as modelled here: the correctly rounded float32 reciprocal, subnormal inputs
    and results flushed to zero (so a subnormal input gives ±inf)."""
    tiny = x.abs() < _F32_MIN_NORMAL
    r = torch.reciprocal(torch.where(tiny, torch.zeros_like(x).copysign(x), x))
    return torch.where(r.abs() < _F32_MIN_NORMAL, torch.zeros_like(r).copysign(r), r)


def _global_multiplier(tensor_amax: torch.Tensor, fmt: ElemFormat) -> torch.Tensor:
    """compressed-tensors' ``generate_gparam``: ``2688 / amax`` (amax clamped at float32's smallest normal, torch's
    ``float / tensor``: 2688 · (1 / amax)), a non-finite result read as 1."""
    gs = (E4M3.max_normal * fmt.max_normal) / tensor_amax.clamp(min=_F32_MIN_NORMAL)
    return torch.nan_to_num(gs, nan=1.0, posinf=1.0, neginf=1.0)


def _kernel_scales(amax: torch.Tensor, scheme: Scheme,
                   tensor_amax: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`block_scales` of ``e4m3_steps=kernel``: vLLM's ``cvt_warp_fp16_to_fp4`` (csrc/quantization/fp4/
    nvfp4_utils.cuh at 2c9ff65) with the global multiplier ``gs`` of :func:`_global_multiplier`:
    ``SFValue = gs · (bmax · rcp(6))`` rounded to E4M3 (saturating), ``outputScale = rcp(SFValue · rcp(gs))``, 0
    where SFValue is 0. Returned as (outputScale, SFValue · rcp(gs), NaN mask, SFValue)."""
    if scheme.tensor_scale is not TensorScale.AMAX:
        raise ValueError("e4m3_steps=kernel takes the kernel's global multiplier from the tensor maximum "
                         "(tensor_scale=amax); a stored input_global_scale is not supported")
    gs = _global_multiplier(tensor_amax, scheme.elem)
    rcp_max = rcp_ftz(amax.new_full((), scheme.elem.max_normal))
    s8 = round_elements(gs * (amax * rcp_max), E4M3, Rounding.EVEN)
    block = s8 * rcp_ftz(gs)
    out = torch.where(s8 != 0, rcp_ftz(block), torch.zeros_like(s8))
    nan = ~torch.isfinite(amax) | (~torch.isfinite(tensor_amax)).expand_as(amax)
    return out, block, nan, s8


def _divide_scales(amax: torch.Tensor, scheme: Scheme, tensor_amax: torch.Tensor | None,
                   static_scale: float | None, src_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`block_scales` of ``e4m3_steps=divide`` (compressed-tensors 0.20): the global scale is a multiplier,
    ``gs = 2688 / amax`` (``generate_gparam``: amax clamped at float32's smallest normal, a non-finite gs read as
    1) or, with ``tensor_scale=static``, the stored ``input_global_scale`` as stored (``static_scale``); block
    scales ``e4m3(gs · (bmax / 6))`` with 0 read as 0.125 (``calculate_qparams``); values divided by ``s / gs`` and
    dequantized by multiplying with it (``_quantize``/``_dequantize``). Returned as (divisor, multiplier, ...):
    :func:`round_on_scales` divides when the scheme says so."""
    fmt = scheme.elem
    nan = ~torch.isfinite(amax)
    s = (amax / amax.new_full((), fmt.max_normal)).to(src_dtype).float()  # the observer's dtype: the input's
    gs = None
    if scheme.tensor_scale is TensorScale.STATIC:
        if static_scale is None:
            raise ValueError("e4m3_steps=divide with tensor_scale=static needs the stored input_global_scale")
        gs, _ = static_tensor_scale(static_scale, amax.device)  # a multiplier here; finite and > 0 alike
    elif scheme.tensor_scale is TensorScale.AMAX:
        gs = _global_multiplier(tensor_amax, fmt)
        nan = nan | (~torch.isfinite(tensor_amax)).expand_as(amax)
    if gs is not None:
        s = gs * s
    s8 = round_elements(s.clamp(-E4M3.max_normal, E4M3.max_normal), E4M3, Rounding.EVEN)
    s8 = torch.where(s8 == 0, torch.full_like(s8, _CT_ZERO_SCALE), s8)
    scale = s8 if gs is None else s8 / gs
    return scale, scale, nan, s8


def block_scales(
    amax: torch.Tensor, scheme: Scheme, tensor_amax: torch.Tensor | None = None, static_scale: float | None = None,
    src_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The scales of blocks whose float32 maxima of |x| are ``amax``: (reciprocal that element values are
    multiplied by before rounding, multiplier that dequantizes them, NaN-block mask, the scales as stored:
    E8M0 exponents (int32) or E4M3 values (float32)). ``tensor_amax``: the tensor maximum setting the
    per-tensor scale, required when the scheme has one (``tensor_scale=amax``); ``static_scale``: the given
    per-tensor scale of ``tensor_scale=static`` (:func:`static_tensor_scale`); ``src_dtype``: the dtype of the
    values before their float32 copy (``e4m3_steps=divide`` computes ``bmax / 6`` in it, as compressed-tensors does).

    Shared by :func:`quantize_blocks` and algorithms that round values on scales chosen beforehand (GPTQ).
    """
    fmt = scheme.elem
    if scheme.scale_format is ScaleFormat.NONE:
        raise ValueError("scale_format=none divides in the input's dtype by its per-tensor scale: quantize_torch "
                         "computes it")
    if scheme.is_mx:
        exp, nan = shared_exponent(amax, fmt, scheme.scale_bits, scheme.scale_mode)
        return pow2(-exp), pow2(exp), nan, exp
    if scheme.tensor_scale is TensorScale.AMAX and tensor_amax is None:  # every E4M3 step order needs it
        raise ValueError("a scheme with a per-tensor scale needs the tensor maximum")
    if scheme.e4m3_steps is E4M3Steps.DIVIDE:
        return _divide_scales(amax, scheme, tensor_amax, static_scale, src_dtype)
    if scheme.e4m3_steps is E4M3Steps.KERNEL:
        return _kernel_scales(amax, scheme, tensor_amax)
    clamp = scheme.e4m3_steps is E4M3Steps.CLAMP
    if scheme.tensor_scale is TensorScale.STATIC:
        if static_scale is None:
            raise ValueError("tensor_scale=static needs the stored per-tensor scale (static_scale)")
        ts, inv_ts = static_tensor_scale(static_scale, amax.device)
        s8 = e4m3_block_scales(amax, fmt, ts, clamp)  # saturates at 448 for a block beyond the calibrated range
        mult = ts * s8
        divisor_or_recip = mult if scheme.e4m3_steps is E4M3Steps.QUARK else inv_ts / s8  # see round_on_scales
        return divisor_or_recip, mult, ~torch.isfinite(amax), s8  # a non-finite value spoils its own block
    if scheme.tensor_scale is TensorScale.AMAX:
        ts, inv_ts = tensor_scale(tensor_amax, fmt)
        nan = (~torch.isfinite(tensor_amax)).expand_as(amax)  # one non-finite value spoils every scale
        s8 = e4m3_block_scales(amax, fmt, ts, clamp)
        return inv_ts / s8, ts * s8, nan, s8
    s8 = e4m3_block_scales(amax, fmt, None, clamp)
    return 1.0 / s8, s8, ~torch.isfinite(amax), s8


def round_on_scales(values: torch.Tensor, recip: torch.Tensor, stored: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """Float32 ``values`` rounded to element values (in units of their block's scale) on the scales of
    :func:`block_scales` (``recip``, ``stored`` broadcast against ``values``). The dividing orders (``e4m3_steps``
    ``divide``, ``quark``) take ``recip`` as the divisor: one correctly rounded float32 division (a zero divisor,
    whose block is zero, read as 1)."""
    if scheme.e4m3_steps in _DIVIDING:
        scaled = values / torch.where(recip == 0, torch.ones_like(recip), recip)
    else:
        scaled = values * recip
    q = round_elements(scaled, scheme.elem, scheme.rounding)
    if not scheme.is_mx:
        q = torch.where(stored == 0, torch.zeros_like(q), q)  # a scale that rounds to zero: a zero block
    return q


def dequantize_elements(q: torch.Tensor, mult: torch.Tensor, nan: torch.Tensor) -> torch.Tensor:
    """Element values times their multiplier, NaN in NaN blocks, zeros as +0."""
    q = q * mult
    return torch.where(nan, torch.full_like(q, float("nan")), q) + 0.0  # +0.0: no -0


def quantize_blocks(
    blocks: torch.Tensor, scheme: Scheme, tensor_amax: torch.Tensor | None = None, static_scale: float | None = None,
    src_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The quantization step on float32 ``blocks`` [..., n_blocks, block], shared by fake quantization
    and packing: (element values in units of the scale, the scale multiplier [..., n_blocks, 1],
    NaN-block mask, the block scales as stored: E8M0 exponents (int32) or E4M3 values (float32)).

    Dequantized values are ``elements * multiplier`` (NaN where masked).
    """
    amax = blocks.abs().amax(-1, keepdim=True)
    if scheme.tensor_scale is TensorScale.AMAX and tensor_amax is None:
        tensor_amax = blocks.abs().amax()
    recip, mult, nan, stored = block_scales(amax, scheme, tensor_amax, static_scale, src_dtype)
    return round_on_scales(blocks, recip, stored, scheme), mult, nan, stored


def _fake_quantize(xf: torch.Tensor, bs: int, scheme: Scheme, tensor_amax: torch.Tensor | None,
                   static_scale: float | None = None, src_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Fake-quantize float32 ``xf`` (a copy of ``src_dtype`` values) whose last axis is a whole number of
    ``bs``-blocks."""
    q, mult, nan, _ = quantize_blocks(xf.reshape(*xf.shape[:-1], -1, bs), scheme, tensor_amax, static_scale, src_dtype)
    return dequantize_elements(q, mult, nan).reshape(xf.shape)


def quantize_torch(
    x: torch.Tensor, scheme: Scheme, axis: int = -1, rotation: Rotation | None = None,
    static_scale: float | None = None,
) -> torch.Tensor:
    """The vectorised torch backend: ``x`` (optionally rotated along ``axis`` first, in float32)
    fake-quantized with ``scheme`` along ``axis``, returned in ``x.dtype``.

    A ragged last block is quantized as a shorter block of its own: the same as
    zero padding (zeros never change a block maximum), without a padded copy.
    The per-tensor maximum, when the scheme has one, is taken over all of ``x``; ``tensor_scale=static``
    takes the given ``static_scale`` instead.
    """
    if x.numel() == 0:
        return x.clone()
    if scheme.scale_format is ScaleFormat.NONE:
        if static_scale is None or rotation is not None:
            raise ValueError("scale_format=none needs the stored per-tensor scale (static_scale) and no rotation")
        return per_tensor_static(x, scheme, static_scale)
    xf = rotate(x, rotation, axis) if rotation is not None else x.to(torch.float32)
    xf = xf.movedim(axis, -1)
    n = xf.shape[-1]
    bs = n if scheme.block_size == 0 else min(scheme.block_size, n)
    full = n - n % bs
    tensor_amax = xf.abs().amax() if scheme.tensor_scale is TensorScale.AMAX else None
    src = x.dtype if rotation is None else torch.float32
    q = _fake_quantize(xf[..., :full], bs, scheme, tensor_amax, static_scale, src)
    if full < n:
        tail = _fake_quantize(xf[..., full:], n - full, scheme, tensor_amax, static_scale, src)
        q = torch.cat([q, tail], dim=-1)
    return q.movedim(-1, axis).to(x.dtype)


def per_tensor_static(x: torch.Tensor, scheme: Scheme, scale: float) -> torch.Tensor:
    """``scale_format=none``: one stored per-tensor scale ``s``, no block scales (AMD Quark's static FP8 inputs,
    ``fake_quantize_fp8_per_tensor_with_scale``): ``x / s`` in ``x``'s dtype (one float32 division rounded to
    ``x``'s dtype, as torch divides a bf16 tensor: a bf16 model's quotient is a bf16 value), clamped to the format's
    largest value, rounded to the element format (nearest-even), times ``s``, returned in ``x``'s dtype."""
    ts, _ = static_tensor_scale(scale, x.device)
    v = (x.to(torch.float32) / ts).to(x.dtype).to(torch.float32)
    m = scheme.elem.max_normal
    return (round_elements(v.clamp(-m, m), scheme.elem, scheme.rounding) * ts).to(x.dtype)


def check_args(x: torch.Tensor, axis: int) -> None:
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"quantize_mx takes float32, bfloat16 or float16 tensors, not {x.dtype}")
    if x.dim() == 0 or not -x.dim() <= axis < x.dim():
        raise ValueError(f"axis {axis} out of range for a tensor of shape {tuple(x.shape)}")


def make_scheme(
    elem_format: str | ElemFormat,
    block_size: int = 32,
    rounding: str | Rounding = "even",
    scale_bits: int = 8,
    scale_mode: str | ScaleMode = "floor",
    scale_format: str | ScaleFormat = "e8m0",
    tensor_scale: str | TensorScale = "none",
) -> Scheme:
    """A ``Scheme`` from names (validated)."""
    return Scheme(
        get_format(elem_format), block_size, get_scale_format(scale_format), get_tensor_scale(tensor_scale),
        get_rounding(rounding), get_scale_mode(scale_mode), scale_bits,
    )


def quantize(x: torch.Tensor, scheme: Scheme, axis: int = -1, rotation: Rotation | None = None) -> torch.Tensor:
    """Fake quantization of ``x`` with ``scheme`` along ``axis`` (quantize, then dequantize to ``x.dtype``)."""
    check_args(x, axis)
    return quantize_torch(x, scheme, axis, rotation)


def quantize_mx(
    x: torch.Tensor,
    elem_format: str | ElemFormat,
    block_size: int = 32,
    axis: int = -1,
    rounding: str | Rounding = "even",
    scale_bits: int = 8,
    scale_mode: str | ScaleMode = "floor",
    scale_format: str | ScaleFormat = "e8m0",
    tensor_scale: str | TensorScale = "none",
) -> torch.Tensor:
    """Fake quantization of ``x`` (quantize, then dequantize to ``x.dtype``).

    Blocks of ``block_size`` elements (0: the whole axis) along ``axis`` share a
    scale: a power of two (E8M0, OCP MX) or an E4M3 value with an optional per-tensor
    scale (``scale_format="e4m3", tensor_scale="amax"``: NVFP4 with ``fp4_e2m1`` and block 16).
    The last block is zero-padded when ragged.
    """
    scheme = make_scheme(elem_format, block_size, rounding, scale_bits, scale_mode, scale_format, tensor_scale)
    return quantize(x, scheme, axis)

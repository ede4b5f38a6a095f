"""MX fake quantization in plain torch: the exact reference every backend must match.

Semantics are those of microxcaling's CUDA path (see tests/data/README.md):
the shared exponent comes from the float32 exponent bits of the block maximum,
elements round with subnormals kept and saturate to the format's max normal,
blocks holding inf/nan become NaN, zeros come back as +0.0.

All arithmetic is on float32 with power-of-two factors, so every step is exact
and the code runs unchanged on CPU and CUDA (and under ``torch.compile``).
"""

from __future__ import annotations

import torch

from .formats import (
    ElemFormat,
    Rounding,
    ScaleMode,
    get_format,
    get_rounding,
    get_scale_mode,
)

_F32_MANT = 23
_F32_BIAS = 127
_F32_NAN_BITS = 0x7FC00000
_F32_SUBNORMAL_2_M127 = 0x00400000  # 2**-127, the smallest E8M0 scale


def pow2(e: torch.Tensor) -> torch.Tensor:
    """Exact float32 ``2**e`` for int32 ``e`` in [-127, 127] (2**-127 is subnormal)."""
    bits = torch.where(e > -_F32_BIAS, (e + _F32_BIAS) << _F32_MANT, _F32_SUBNORMAL_2_M127)
    return bits.to(torch.int32).view(torch.float32)  # explicit: inductor may widen the scalar


def _biased_exponent(x: torch.Tensor) -> torch.Tensor:
    return (x.view(torch.int32) >> _F32_MANT) & 0xFF


def shared_exponent(
    amax: torch.Tensor, fmt: ElemFormat, scale_bits: int, scale_mode: ScaleMode
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unbiased shared exponent (int32, clamped) and a mask of NaN blocks.

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
    """Round float32 ``v`` (already divided by the shared scale) to ``fmt``, saturating."""
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


def quantize_blocks(
    blocks: torch.Tensor, fmt: ElemFormat, rounding: Rounding, scale_bits: int, scale_mode: ScaleMode
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The MX step on float32 ``blocks`` [..., n_blocks, block]: (shared exponent, NaN-block mask,
    element values in units of the scale). Shared by fake quantization and packing."""
    amax = blocks.abs().amax(-1, keepdim=True)
    exp, nan = shared_exponent(amax, fmt, scale_bits, scale_mode)
    return exp, nan, round_elements(blocks * pow2(-exp), fmt, rounding)


def _quantize_blocks(
    xf: torch.Tensor, bs: int, fmt: ElemFormat, rounding: Rounding, scale_bits: int, scale_mode: ScaleMode
) -> torch.Tensor:
    """Fake-quantize float32 ``xf`` whose last axis is a whole number of ``bs``-blocks."""
    exp, nan, q = quantize_blocks(xf.reshape(*xf.shape[:-1], -1, bs), fmt, rounding, scale_bits, scale_mode)
    q = q * pow2(exp)
    q = torch.where(nan, torch.full_like(q, float("nan")), q) + 0.0  # +0.0: no -0
    return q.reshape(xf.shape)


def quantize_mx_torch(
    x: torch.Tensor,
    fmt: ElemFormat,
    block_size: int,
    axis: int,
    rounding: Rounding,
    scale_bits: int,
    scale_mode: ScaleMode,
) -> torch.Tensor:
    """The vectorised torch backend (resolved arguments; see :func:`quantize_mx`).

    A ragged last block is quantized as a shorter block of its own: the same as
    zero padding (zeros never change a block maximum), without a padded copy.
    """
    if x.numel() == 0:
        return x.clone()
    xf = x.to(torch.float32).movedim(axis, -1)
    n = xf.shape[-1]
    bs = n if block_size == 0 else min(block_size, n)
    full = n - n % bs
    q = _quantize_blocks(xf[..., :full], bs, fmt, rounding, scale_bits, scale_mode)
    if full < n:
        tail = _quantize_blocks(xf[..., full:], n - full, fmt, rounding, scale_bits, scale_mode)
        q = torch.cat([q, tail], dim=-1)
    return q.movedim(-1, axis).to(x.dtype)


def check_args(
    x: torch.Tensor, block_size: int, axis: int, scale_bits: int
) -> None:
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"quantize_mx takes float32, bfloat16 or float16 tensors, not {x.dtype}")
    if not isinstance(block_size, int) or block_size < 0:
        raise ValueError(f"block_size must be an int >= 0 (0 = whole axis), got {block_size!r}")
    if not 2 <= scale_bits <= 8:
        raise ValueError(f"scale_bits must be in 2..8, got {scale_bits!r}")
    if x.dim() == 0 or not -x.dim() <= axis < x.dim():
        raise ValueError(f"axis {axis} out of range for a tensor of shape {tuple(x.shape)}")


def quantize_mx(
    x: torch.Tensor,
    elem_format: str | ElemFormat,
    block_size: int = 32,
    axis: int = -1,
    rounding: str | Rounding = "even",
    scale_bits: int = 8,
    scale_mode: str | ScaleMode = "floor",
) -> torch.Tensor:
    """MX fake quantization of ``x`` (quantize, then dequantize to ``x.dtype``).

    Blocks of ``block_size`` elements (0: the whole axis) along ``axis`` share a
    power-of-two scale; the last block is zero-padded when ragged.
    """
    check_args(x, block_size, axis, scale_bits)
    return quantize_mx_torch(
        x,
        get_format(elem_format),
        block_size,
        axis,
        get_rounding(rounding),
        scale_bits,
        get_scale_mode(scale_mode),
    )

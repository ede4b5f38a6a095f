"""Packed MX storage: element codes and uint8 E8M0 scales, the real bits an MX tensor occupies.

``pack_mx`` stores a tensor quantized along its last axis as OCP MX codes; ``unpack_mx``
gives back exactly what :func:`lm_eval_mx.numerics.quantize_mx` returns for the same
arguments (bit for bit; the tests check every format). Storage per element:

* 8-bit formats (fp8, int8): one code a byte;
* fp6: one code a byte (6 of 8 bits used). Four codes in three bytes would save 24% more,
  but every load would then straddle bytes; fp6 weights are rare, so simplicity wins here;
* 4-bit formats (fp4, int4): two codes a byte, low nibble first;
* int2: four codes a byte;

plus one E8M0 byte per block (255 = NaN block). A ragged last block is zero-padded.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .formats import ElemFormat, Rounding, ScaleMode, get_format, get_rounding, get_scale_mode
from .numerics import check_args, pow2, quantize_blocks

_E8M0_NAN = 255


@dataclass
class MXPacked:
    """An MX tensor: ``codes`` [..., packed K], ``scales`` [..., blocks] (E8M0), original ``shape``."""

    codes: torch.Tensor
    scales: torch.Tensor
    shape: torch.Size
    fmt: ElemFormat
    block_size: int

    @property
    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * self.scales.element_size()


def codes_per_byte(fmt: ElemFormat) -> int:
    return {8: 1, 6: 1, 4: 2, 2: 4}[fmt.bits]


@functools.cache
def code_table(fmt: ElemFormat) -> torch.Tensor:
    """Value (in units of the block scale) of every code of ``fmt``: float32 [2**bits]."""
    mag_bits = fmt.bits - 1
    values = []
    for code in range(2**fmt.bits):
        sign = -1.0 if code >> mag_bits else 1.0
        mag = code & ((1 << mag_bits) - 1)
        if fmt.is_int:
            v = mag * 2.0**-fmt.mbits
        else:
            e_field, m = mag >> fmt.mbits, mag & ((1 << fmt.mbits) - 1)
            if e_field == 0:
                v = m * 2.0 ** (fmt.emin - fmt.mbits)
            else:
                v = (1 + m / 2**fmt.mbits) * 2.0 ** (e_field - 1 + fmt.emin)
        values.append(sign * v if v <= fmt.max_normal else float("nan"))  # e.g. e4m3's S.1111.111
    return torch.tensor(values, dtype=torch.float32)


def _encode(q: torch.Tensor, fmt: ElemFormat) -> torch.Tensor:
    """Codes (int32) of element values ``q`` that are exactly representable in ``fmt``."""
    sign = (q < 0).to(torch.int32) << (fmt.bits - 1)
    a = q.abs()
    if fmt.is_int:
        mag = (a * 2.0**fmt.mbits).to(torch.int32)
    else:
        e = ((a.view(torch.int32) >> 23) & 0xFF) - 127
        normal = e >= fmt.emin
        e_n = e.clamp(min=fmt.emin)
        mant_n = ((a * pow2(-e_n) - 1.0) * 2.0**fmt.mbits).to(torch.int32)
        mag_n = ((e_n - fmt.emin + 1) << fmt.mbits) | mant_n
        mag_s = (a * 2.0 ** (fmt.mbits - fmt.emin)).to(torch.int32)
        mag = torch.where(normal, mag_n, mag_s)
    return torch.where(a == 0, torch.zeros_like(mag), sign | mag)


def packed_layout(shape: torch.Size | tuple[int, ...], fmt: ElemFormat, block_size: int) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """(codes shape, scales shape, block) of a tensor of ``shape`` packed along its last axis.

    ``block_size=0`` is one block per row; a block shorter than 32 codes of a
    sub-byte format is padded to a whole byte.
    """
    n = shape[-1]
    bs = n if block_size == 0 else min(block_size, n)
    per = codes_per_byte(fmt)
    nblocks = -(-n // bs)
    bs_eff = bs + (-bs) % per
    return (*shape[:-1], nblocks * bs_eff // per), (*shape[:-1], nblocks), bs


def pack_mx(
    x: torch.Tensor,
    elem_format: str | ElemFormat,
    block_size: int = 32,
    rounding: str | Rounding = "even",
    scale_bits: int = 8,
    scale_mode: str | ScaleMode = "floor",
) -> MXPacked:
    """Quantize ``x`` along its last axis and store it packed."""
    fmt = get_format(elem_format)
    check_args(x, block_size, -1, scale_bits)
    if x.shape[-1] == 0:
        raise ValueError(f"pack_mx needs a tensor with a non-empty last axis, got shape {tuple(x.shape)}")
    n = x.shape[-1]
    codes_shape, _, bs = packed_layout(x.shape, fmt, block_size)
    per = codes_per_byte(fmt)
    bs_eff = bs + (-bs) % per
    xf = x.to(torch.float32)
    pad = (-n) % bs
    if pad:
        xf = torch.nn.functional.pad(xf, (0, pad))
    blocks = xf.reshape(*x.shape[:-1], -1, bs)
    exp, nan, q = quantize_blocks(blocks, fmt, get_rounding(rounding), scale_bits, get_scale_mode(scale_mode))
    codes = _encode(q.masked_fill(nan, 0.0), fmt)
    if bs_eff != bs:
        codes = torch.nn.functional.pad(codes, (0, bs_eff - bs))
    codes = codes.reshape(*x.shape[:-1], -1, per)
    shifts = torch.arange(per, dtype=torch.int32, device=x.device) * (8 // per)
    packed = (codes << shifts).sum(-1).to(torch.uint8).reshape(codes_shape)
    scales = torch.where(nan, _E8M0_NAN, exp + 127).squeeze(-1).to(torch.uint8)
    return MXPacked(packed, scales, x.shape, fmt, bs)


def unpack_mx(p: MXPacked, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize packed MX back to ``dtype``: equal to ``quantize_mx`` of the original."""
    per = codes_per_byte(p.fmt)
    width = 8 // per
    shifts = torch.arange(per, device=p.codes.device, dtype=torch.int32) * width
    codes = (p.codes.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << width) - 1)
    codes = codes.reshape(*p.shape[:-1], -1)
    n = p.shape[-1]
    nblocks = p.scales.shape[-1]
    bs_eff = codes.shape[-1] // nblocks
    codes = codes.reshape(*p.shape[:-1], nblocks, bs_eff)[..., : p.block_size]
    values = code_table(p.fmt).to(p.codes.device)[codes.long()]
    s = p.scales.to(torch.int32).unsqueeze(-1)
    out = values * pow2((s - 127).clamp(-127, 127))
    out = torch.where(s == _E8M0_NAN, torch.full_like(out, float("nan")), out) + 0.0
    return out.reshape(*p.shape[:-1], -1)[..., :n].to(dtype)

"""Packed storage: element codes and uint8 block scales, the real bits a quantized tensor occupies.

``pack_mx`` stores a tensor quantized along its last axis as OCP MX codes; ``unpack_mx``
gives back exactly what :func:`lm_eval_mx.numerics.quantize.quantize_mx` returns for the same
arguments (bit for bit; the tests check every format). Storage per element:

* 8-bit formats (fp8, int8): one code a byte;
* fp6: one code a byte (6 of 8 bits used). Four codes in three bytes would save 24% more,
  but every load would then straddle bytes; fp6 weights are rare, so simplicity wins here;
* 4-bit formats (fp4, int4): two codes a byte, low nibble first;
* int2: four codes a byte;

plus one scale byte per block: E8M0 (255 = NaN block) or E4M3 (0x7F = NaN block), and for schemes
with a per-tensor scale one float32 per tensor. A ragged last block is zero-padded.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .formats import ElemFormat, Scheme, TensorScale
from .quantize import check_args, make_scheme, pow2, quantize_blocks, tensor_scale
from .rotation import Rotation, rotate

_E8M0_NAN = 255
_E4M3_NAN = 0x7F


@dataclass
class MXPacked:
    """A quantized tensor: ``codes`` [..., packed K], ``scales`` [..., blocks] (uint8: E8M0 exponents, or the
    bits of E4M3 values), the float32 per-tensor scale when the scheme has one, the original ``shape``."""

    codes: torch.Tensor
    scales: torch.Tensor
    shape: torch.Size
    scheme: Scheme
    block_size: int  # elements per scale along the last axis (the scheme's, or the row for block_size=0)
    tensor_scale: torch.Tensor | None = None
    # The per-tensor scale divides the E4M3 block scales instead of multiplying them: ``s8 / tensor_scale``
    # (compressed-tensors' ``weight_global_scale``, which has no exact reciprocal for some checkpoints).
    tensor_scale_divides: bool = False

    @property
    def fmt(self) -> ElemFormat:
        return self.scheme.elem

    @property
    def nbytes(self) -> int:
        ts = 0 if self.tensor_scale is None else self.tensor_scale.numel() * 4
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * self.scales.element_size() + ts


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


def pack(
    x: torch.Tensor, scheme: Scheme, rotation: Rotation | None = None, tensor_amax: torch.Tensor | None = None
) -> MXPacked:
    """Rotate (optionally) and quantize ``x`` along its last axis with ``scheme``, and store it packed.

    ``tensor_amax``: the maximum that sets the per-tensor scale, when ``x`` is a slice of the tensor
    it belongs to (default: ``x``'s own).
    """
    fmt = scheme.elem
    check_args(x, -1)
    if x.shape[-1] == 0:
        raise ValueError(f"pack_mx needs a tensor with a non-empty last axis, got shape {tuple(x.shape)}")
    n = x.shape[-1]
    bs = packed_layout(x.shape, fmt, scheme.block_size)[2]
    xf = rotate(x, rotation) if rotation is not None else x.to(torch.float32)
    ts = None
    if scheme.tensor_scale is TensorScale.AMAX:
        if tensor_amax is None:
            tensor_amax = xf.abs().amax()
        ts = tensor_scale(tensor_amax.to(torch.float32), fmt)[0]
    pad = (-n) % bs
    if pad:
        xf = torch.nn.functional.pad(xf, (0, pad))
    blocks = xf.reshape(*x.shape[:-1], -1, bs)
    q, _, nan, stored = quantize_blocks(blocks, scheme, tensor_amax)
    return pack_elements(q.reshape(*x.shape[:-1], -1)[..., :n], nan.squeeze(-1), stored.squeeze(-1), scheme, ts)


def pack_elements(elements: torch.Tensor, nan: torch.Tensor, stored: torch.Tensor, scheme: Scheme,
                  tensor_scale: torch.Tensor | None = None) -> MXPacked:
    """Store element values already rounded on their block scales (GPTQ rounds on scales it chose itself).

    ``elements`` [..., n]: values in units of their block's scale, each exactly representable in the element
    format; ``nan`` [..., blocks]: NaN blocks; ``stored`` [..., blocks]: the scales as :func:`block_scales`
    gives them (E8M0 exponents, int32, or E4M3 values, float32); ``tensor_scale``: the per-tensor scale of schemes
    that have one. :func:`pack` is this on the elements and scales of round to nearest.
    """
    fmt = scheme.elem
    shape = elements.shape
    codes_shape, _, bs = packed_layout(shape, fmt, scheme.block_size)
    per = codes_per_byte(fmt)
    bs_eff = bs + (-bs) % per
    pad = (-shape[-1]) % bs
    if pad:
        elements = torch.nn.functional.pad(elements, (0, pad))
    blocks = elements.reshape(*shape[:-1], -1, bs)
    codes = _encode(blocks.masked_fill(nan.unsqueeze(-1), 0.0), fmt)
    if bs_eff != bs:
        codes = torch.nn.functional.pad(codes, (0, bs_eff - bs))
    codes = codes.reshape(*shape[:-1], -1, per)
    shifts = torch.arange(per, dtype=torch.int32, device=elements.device) * (8 // per)
    packed = (codes << shifts).sum(-1).to(torch.uint8).reshape(codes_shape)
    if scheme.is_mx:
        scales = torch.where(nan, _E8M0_NAN, stored + 127).to(torch.uint8)
    else:
        bits = stored.to(torch.float8_e4m3fn).view(torch.uint8)
        scales = torch.where(nan, torch.full_like(bits, _E4M3_NAN), bits)
    return MXPacked(packed, scales, shape, scheme, bs, tensor_scale)


def pack_mx(x: torch.Tensor, elem_format: str | ElemFormat, block_size: int = 32, **scheme_keys: object) -> MXPacked:
    """Quantize ``x`` along its last axis and store it packed; ``scheme_keys`` are those of
    :func:`lm_eval_mx.numerics.quantize.make_scheme` (block_size, rounding, scale_bits, scale_mode, scale_format,
    tensor_scale), with quantize_mx's defaults (OCP MX)."""
    return pack(x, make_scheme(elem_format, block_size, **scheme_keys))  # type: ignore[arg-type]


def scale_multipliers(p: MXPacked) -> torch.Tensor:
    """float32 [..., blocks]: what each block's element values are multiplied by (NaN for NaN blocks):
    ``2**(s - 127)`` for E8M0, ``tensor_scale · e4m3(s)`` for E4M3 scales (``e4m3(s) / tensor_scale`` when
    ``tensor_scale_divides``: one correctly rounded float32 division)."""
    s = p.scales
    if p.scheme.is_mx:
        s = s.to(torch.int32)
        return torch.where(s == _E8M0_NAN, float("nan"), pow2((s - 127).clamp(-127, 127)))
    s8 = s.view(torch.float8_e4m3fn).to(torch.float32)  # 0x7F/0xFF decode as NaN
    if p.tensor_scale is None:
        return s8
    ts = p.tensor_scale.to(torch.float32)
    ts = ts.reshape(*ts.shape, *([1] * (s8.dim() - ts.dim())))
    return s8 / ts if p.tensor_scale_divides else ts * s8


def unpack_mx(p: MXPacked, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize a packed tensor back to ``dtype``: equal to fake quantization of the original."""
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
    out = values * scale_multipliers(p).unsqueeze(-1)
    out = out + 0.0
    return out.reshape(*p.shape[:-1], -1)[..., :n].to(dtype)

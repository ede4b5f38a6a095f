"""AMD Quark's HF export (``quant_method: quark``, ``weight_format: real_quantized``): its MX weight layouts.

Quark stores a quantized linear layer's codes under ``weight`` and its block scales under ``weight_scale``
(amd-quark 0.13, ``quark/torch/export/nn/modules/realquantizer.py``, ``quark/torch/utils/pack.py``):

* MXFP4 (``dtype: fp4``, ``group_size: 32``, ``scale_format: e8m0``): ``weight`` uint8 [N, K/2], E2M1 codes two a
  byte, the element of even index in the low nibble (``Pack_fp4``), sign bit 3: compressed-tensors' MXFP4 bytes;
  ``weight_scale`` uint8 [N, K/32], a biased E8M0 exponent (``to_e8m0_uint8``); decoded ``value · 2**(s-127)``.
* MXFP6 E2M3 / E3M2 (``dtype: fp6_e2m3`` / ``fp6_e3m2``): ``weight`` uint8 [N, 3K/4], four 6-bit codes in three
  bytes (``Pack_fp6``): codes ``v0..v3`` of four consecutive elements form the 24-bit little-endian word
  ``v0 | v1 << 6 | v2 << 12 | v3 << 18`` (byte 0 = bits 0-7); a code is sign (bit 5), exponent and mantissa (bits
  0-4) as OCP's FP6 encodings; ``weight_scale`` as MXFP4.
* NVFP4 (a two-stage ``[fp4 per_group 16 float32, fp8_e4m3 per_tensor]`` spec): ModelOpt's layout, ``weight``
  uint8 [N, K/2], ``weight_scale`` float8_e4m3fn [N, K/16], ``weight_scale_2`` float32 ``()``; decoded
  ``value · (float32(s8) · weight_scale_2)`` (``SequentialRealQuantizer.forward``,
  ``dequantize_fp8_per_tensor_with_scale`` then ``dequantize_fp4_fp6_per_group``): :mod:`.modelopt`'s functions.

Every decoder returns float32 equal to Quark's float32 dequantized weight bit for bit (-0.0 where Quark has it).
"""

from __future__ import annotations

import dataclasses

import torch

from ..formats import FORMATS, ScaleMode, Scheme
from ..packing import MXPacked, _encode, code_table
from ..quantize import quantize_blocks, round_elements
from ._common import _E8M0_NAN, _MX_BLOCK, CT_MXFP4, _blocks, _check_weight, _e8m0_multiplier, _need, _need_shape
from .compressed_tensors import ct_mxfp4_to_packed, decode_ct_mxfp4, encode_ct_mxfp4

QUARK_MXFP6_E2M3: Scheme = dataclasses.replace(CT_MXFP4, elem=FORMATS["fp6_e2m3"])
QUARK_MXFP6_E3M2: Scheme = dataclasses.replace(CT_MXFP4, elem=FORMATS["fp6_e3m2"])
_FP6 = {"fp6_e2m3": QUARK_MXFP6_E2M3, "fp6_e3m2": QUARK_MXFP6_E3M2}


# ----------------------------------------------------------------------------------------------------------
# MXFP4: compressed-tensors' bytes under Quark's names


def decode_quark_mxfp4(weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """Decoding Quark MXFP4 -> float32 [N, K]: :func:`decode_ct_mxfp4` of the same bytes (Quark's ``Pack_fp4.unpack``
    builds each value's float32 bits and multiplies by ``2**126``, exact; the scale is ``2 ** (s - 127)``)."""
    return decode_ct_mxfp4(weight, weight_scale)


def encode_quark_mxfp4(w: torch.Tensor, weight_scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """A weight -> Quark MXFP4 tensors, scales by Quark's default ``scale_calculation_mode: even`` (this project's
    ``scale_mode=even``, Quark's ``even_round``)."""
    out = encode_ct_mxfp4(w, weight_scale)
    return {"weight": out["weight_packed"], "weight_scale": out["weight_scale"]}


def quark_mxfp4_to_packed(weight: torch.Tensor, weight_scale: torch.Tensor, scheme: Scheme = CT_MXFP4) -> MXPacked:
    """Quark MXFP4 -> :class:`MXPacked`, bytes as they are."""
    return ct_mxfp4_to_packed(weight, weight_scale, scheme)


# ----------------------------------------------------------------------------------------------------------
# MXFP6: four codes in three bytes


def unpack_fp6(weight: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 3K/4] (Quark's ``Pack_fp6``) -> uint8 6-bit codes [..., K], first element in the low bits."""
    _need("weight", weight, torch.uint8, 2)
    if weight.shape[-1] % 3:
        raise ValueError(f"weight: {weight.shape[-1]} bytes per row is not a multiple of 3 (four FP6 codes in "
                         "three bytes)")
    b = weight.reshape(*weight.shape[:-1], -1, 3).to(torch.int32)
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
    codes = torch.stack([(word >> (6 * i)) & 0x3F for i in range(4)], dim=-1)
    return codes.flatten(-2).to(torch.uint8)


def pack_fp6(codes: torch.Tensor) -> torch.Tensor:
    """uint8 6-bit codes [..., K] (K a multiple of 4) -> Quark's three bytes per four codes."""
    c = codes.reshape(*codes.shape[:-1], -1, 4).to(torch.int32)
    word = c[..., 0] | (c[..., 1] << 6) | (c[..., 2] << 12) | (c[..., 3] << 18)
    return torch.stack([(word >> (8 * i)) & 0xFF for i in range(3)], dim=-1).flatten(-2).to(torch.uint8)


def _check_fp6(weight: torch.Tensor, weight_scale: torch.Tensor) -> int:
    _need("weight", weight, torch.uint8, 2)
    _need("weight_scale", weight_scale, torch.uint8, 2)
    if weight.shape[-1] % 3:
        raise ValueError(f"weight: {weight.shape[-1]} bytes per row is not a multiple of 3 (four FP6 codes in "
                         "three bytes)")
    k = weight.shape[-1] // 3 * 4
    if k % _MX_BLOCK:
        raise ValueError(f"weight: {k} elements per row is not a multiple of the block of {_MX_BLOCK}")
    _need_shape("weight_scale", weight_scale, (*weight.shape[:-1], k // _MX_BLOCK),
                f"one scale per {_MX_BLOCK} elements of weight {tuple(weight.shape)}")
    return k


def decode_quark_mxfp6(weight: torch.Tensor, weight_scale: torch.Tensor, fmt: str = "fp6_e2m3") -> torch.Tensor:
    """Decoding Quark MXFP6 -> float32 [N, K]: codes by :func:`unpack_fp6`, each the OCP FP6 value of ``fmt`` (Quark builds
    its float32 bits ``(c & 0x1F) << (23 - mbits) | (c & 0x20) << 26`` times ``2**(127 - bias)``, exact), times
    ``2**(weight_scale - 127)`` (255: NaN here; Quark computes ``2**128 = inf``)."""
    _check_fp6(weight, weight_scale)
    values = code_table(_FP6[fmt].elem).to(weight.device)[unpack_fp6(weight).long()]
    return (_blocks(values, _MX_BLOCK) * _e8m0_multiplier(weight_scale).unsqueeze(-1)).flatten(-2)


def encode_quark_mxfp6(w: torch.Tensor, weight_scale: torch.Tensor | None = None,
                       fmt: str = "fp6_e2m3") -> dict[str, torch.Tensor]:
    """A weight -> Quark MXFP6 tensors (scales by ``scale_mode=even``, Quark's default, unless given);
    given ``weight_scale`` it inverts :func:`decode_quark_mxfp6` (zeros as code 0)."""
    scheme = _FP6[fmt]
    w = _check_weight(w, _MX_BLOCK)
    blocks = _blocks(w.to(torch.float32), _MX_BLOCK)
    if weight_scale is None:
        _, _, nan, exp = quantize_blocks(blocks, scheme)
        weight_scale = torch.where(nan, _E8M0_NAN, exp + 127).squeeze(-1).to(torch.uint8)
    mult = _e8m0_multiplier(weight_scale.clamp(max=254)).unsqueeze(-1)
    q = round_elements(blocks / mult, scheme.elem, scheme.rounding).masked_fill(
        (weight_scale == _E8M0_NAN).unsqueeze(-1), 0.0)
    return {"weight": pack_fp6(_encode(q, scheme.elem).flatten(-2)), "weight_scale": weight_scale}


def quark_mxfp6_to_packed(weight: torch.Tensor, weight_scale: torch.Tensor, fmt: str = "fp6_e2m3",
                          scale_mode: ScaleMode = ScaleMode.EVEN) -> MXPacked:
    """Quark MXFP6 -> :class:`MXPacked` (fp6 is one code a byte there): the codes unpacked from three bytes per four,
    the E8M0 bytes as they are; bit-identical values."""
    k = _check_fp6(weight, weight_scale)
    scheme = dataclasses.replace(_FP6[fmt], scale_mode=scale_mode)
    return MXPacked(unpack_fp6(weight), weight_scale, torch.Size((*weight.shape[:-1], k)), scheme, _MX_BLOCK)


def decode_quark_mxfp6_e2m3(weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """Decoding Quark MXFP6 E2M3: :func:`decode_quark_mxfp6` with ``fmt="fp6_e2m3"``."""
    return decode_quark_mxfp6(weight, weight_scale, "fp6_e2m3")


def decode_quark_mxfp6_e3m2(weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """Decoding Quark MXFP6 E3M2: :func:`decode_quark_mxfp6` with ``fmt="fp6_e3m2"``."""
    return decode_quark_mxfp6(weight, weight_scale, "fp6_e3m2")


def encode_quark_mxfp6_e2m3(w: torch.Tensor, weight_scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    return encode_quark_mxfp6(w, weight_scale, "fp6_e2m3")


def encode_quark_mxfp6_e3m2(w: torch.Tensor, weight_scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    return encode_quark_mxfp6(w, weight_scale, "fp6_e3m2")


def quark_mxfp6_e2m3_to_packed(weight: torch.Tensor, weight_scale: torch.Tensor) -> MXPacked:
    return quark_mxfp6_to_packed(weight, weight_scale, "fp6_e2m3")


def quark_mxfp6_e3m2_to_packed(weight: torch.Tensor, weight_scale: torch.Tensor) -> MXPacked:
    return quark_mxfp6_to_packed(weight, weight_scale, "fp6_e3m2")

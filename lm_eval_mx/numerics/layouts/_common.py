"""Pieces every packed FP4 layout shares: checks, nibble packing, E2M1 codes, E8M0 multipliers, the schemes.

All four layouts store FP4 E2M1 codes two to a byte, the element of even index in the low nibble, a code being
sign (bit 3) and magnitude index (bits 0-2) into ``0, 0.5, 1, 1.5, 2, 3, 4, 6`` (this project's
:func:`lm_eval_mx.numerics.packing.code_table` for ``fp4_e2m1``).
"""

from __future__ import annotations

import dataclasses

import torch

from ..formats import FORMATS, NAMED_SCHEMES, Rounding, ScaleMode, Scheme
from ..packing import _encode, code_table
from ..quantize import pow2, quantize_blocks, round_elements

FP4 = FORMATS["fp4_e2m1"]
NVFP4: Scheme = NAMED_SCHEMES["nvfp4"]
MXFP4: Scheme = NAMED_SCHEMES["mxfp4"]
# compressed-tensors rounds the block maximum to a power of two half-up at E2M1's mantissa (round_to_power_2)
# before taking the exponent: this project's scale_mode=even.
CT_MXFP4: Scheme = dataclasses.replace(MXFP4, scale_mode=ScaleMode.EVEN)

_NVFP4_BLOCK = 16
_MX_BLOCK = 32
_E4M3_MAX_TIMES_FP4_MAX = 448.0 * 6.0  # 2688: both libraries' per-tensor constant
_E8M0_NAN = 255


# ----------------------------------------------------------------------------------------------------------
# Shared pieces: checks, nibbles, E2M1 codes


def _need(name: str, t: object, dtype: torch.dtype, ndim_min: int = 1) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor of dtype {dtype}, got {type(t).__name__}")
    if t.dtype != dtype:
        raise ValueError(f"{name}: expected dtype {dtype}, got {t.dtype} (shape {tuple(t.shape)})")
    if t.dim() < ndim_min:
        raise ValueError(f"{name}: expected at least {ndim_min} dimensions, got shape {tuple(t.shape)}")
    return t


def _need_shape(name: str, t: torch.Tensor, shape: tuple[int, ...], why: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)} ({why}), got {tuple(t.shape)}")


def _per_tensor(name: str, t: object, lead: tuple[int, ...]) -> torch.Tensor:
    """A float32 per-tensor scale: one value (any shape of one element), or one per leading index (stacked
    experts: shape ``lead`` or ``(*lead, 1)``); returned shaped ``(*lead, 1, 1)`` to broadcast over blocks."""
    t = _need(name, t, torch.float32, 0)
    if t.numel() == 1:
        return t.reshape((1,) * (len(lead) + 2))
    if lead and tuple(t.shape) in (lead, (*lead, 1)):
        return t.reshape(*lead, 1, 1)
    raise ValueError(f"{name}: expected one float32 value (shape (1,) or ()) or one per leading index "
                     f"(shape {lead}), got shape {tuple(t.shape)}")


def _ts_for_packed(t: torch.Tensor, lead: tuple[int, ...]) -> torch.Tensor:
    return t.reshape(()) if t.numel() == 1 else t.reshape(lead)


def _fp4_lut(negative_zero: bool, device: torch.device) -> torch.Tensor:
    """E2M1 values of the 16 codes, float32; code 8 is -0.0, or +0.0 (ModelOpt's table)."""
    lut = code_table(FP4).to(device)  # code 8 is -0.0
    return lut if negative_zero else torch.where(lut == 0, 0.0, lut)


def _unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] -> int64 codes [..., K], low nibble first."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2).long()


def _pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """int codes [..., K] (0..15) -> uint8 [..., K/2], the element of even index in the low nibble."""
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def fp4_codes(scaled: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (int32) of float32 values already divided by their block scale: rounded to nearest-even on
    E2M1's grid, saturating at ±6. The sign bit is set for every value < 0, so a small negative value that
    rounds to zero is code 8 (-0), as compressed-tensors (``torch.sign``) and ModelOpt (``weight < 0``) write
    it; -0.0 itself is code 0 in both. NaN is the caller's to exclude."""
    magnitude = _encode(round_elements(scaled, FP4, Rounding.EVEN).abs(), FP4)
    return magnitude | ((scaled < 0).to(torch.int32) << 3)


def _check_fp4_pair(packed_name: str, packed: torch.Tensor, scale_name: str, scale: torch.Tensor,
                    block: int) -> int:
    """The unpacked length K; ``ValueError`` unless ``scale`` is [..., K/block] beside ``packed`` [..., K/2]."""
    k = packed.shape[-1] * 2
    if k % block:
        raise ValueError(f"{packed_name}: {k} elements per row ({packed.shape[-1]} bytes) is not a multiple of "
                         f"the block of {block}")
    _need_shape(scale_name, scale, (*packed.shape[:-1], k // block),
                f"one scale per {block} elements of {packed_name} {tuple(packed.shape)}")
    return k


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    return x.reshape(*x.shape[:-1], x.shape[-1] // block, block)


def _check_weight(w: object, block: int) -> torch.Tensor:
    if not isinstance(w, torch.Tensor) or w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"weight: expected a float32, bfloat16 or float16 tensor, got "
                         f"{getattr(w, 'dtype', type(w).__name__)}")
    if w.dim() < 2 or w.shape[-1] % block:
        raise ValueError(f"weight: expected shape [..., N, K] with K a multiple of {block}, got {tuple(w.shape)}")
    return w


def _e8m0_multiplier(scales: torch.Tensor) -> torch.Tensor:
    """float32 ``2**(s - 127)`` of uint8 E8M0 scales, exact (2**-127 subnormal); 255 is NaN (OCP MX)."""
    s = scales.to(torch.int32)
    return torch.where(s == _E8M0_NAN, float("nan"), pow2((s - 127).clamp(-127, 127)))



def _check_mx_scheme(scheme: Scheme) -> None:
    if scheme.elem != FP4 or scheme.block_size != _MX_BLOCK or not scheme.is_mx or scheme.scale_bits != 8:
        raise ValueError(f"scheme: expected fp4_e2m1 with block 32 and 8-bit E8M0 scales, got {scheme.name}")


def encode_e8m0_fp4(w: torch.Tensor, scheme: Scheme, scales: torch.Tensor | None, name: str
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight [..., N, K] -> (FP4 codes packed per block [..., N, K/32, 16], E8M0 scale bytes [..., N, K/32]):
    the scales ``scheme``'s (or ``scales``, named ``name`` in errors), elements ``w / 2**(s-127)`` as E2M1 codes;
    a NaN block (scale 255) holds codes 0. The MXFP4 encoders of every layout (compressed-tensors, gpt-oss) use it."""
    w = _check_weight(w, _MX_BLOCK)
    b = _blocks(w.to(torch.float32), _MX_BLOCK)
    if scales is None:
        _, _, nan, exp = quantize_blocks(b, scheme)
        scales = torch.where(nan, _E8M0_NAN, exp + 127).squeeze(-1).to(torch.uint8)
    _need(name, scales, torch.uint8, 2)
    _need_shape(name, scales, b.shape[:-1], "one scale per 32 elements")
    scaled = b * pow2(127 - scales.to(torch.int32).clamp(max=254)).unsqueeze(-1)  # exact
    scaled = scaled.masked_fill((scales == _E8M0_NAN).unsqueeze(-1), 0.0)  # a NaN block: codes 0
    return _pack_codes(fp4_codes(scaled)), scales


def _check_nvfp4(names: tuple[str, str, str], packed: torch.Tensor, scale: torch.Tensor,
                 per_tensor: torch.Tensor) -> torch.Tensor:
    """The three tensors every NVFP4 layout stores (packed E2M1 codes, E4M3 block scales of 16, one float32
    per-tensor scale per matrix), checked and named by the layout's own ``names``; returns the per-tensor scale."""
    codes, scales, tensor = names
    _need(codes, packed, torch.uint8, 2)
    _need(scales, scale, torch.float8_e4m3fn, 2)
    _check_fp4_pair(codes, packed, scales, scale, _NVFP4_BLOCK)
    return _per_tensor(tensor, per_tensor, tuple(packed.shape[:-2]))

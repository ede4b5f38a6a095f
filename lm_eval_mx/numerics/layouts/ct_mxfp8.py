"""compressed-tensors ``mxfp8-quantized`` (llm-compressor's MXFP8 / MXFP8A16; auto-round's MXFP8 in its
``auto_round:llm_compressor`` packing writes the same tensors).

Stored per layer: ``weight`` float8_e4m3fn [N, K] (one code a byte, the E4M3 bits as they are) and ``weight_scale``
uint8 [N, K/32], a biased E8M0 exponent. Decoding, as ``MXFP8QuantizationCompressor.decompress`` (compressed-tensors
0.19, ``compressors/mxfp8/base.py``, ``compressors/mx_utils.py: decompress_mx_scale``) and auto-round's
``MXFP8QuantLinear`` (``experimental/qmodules/mx.py``) compute it: ``W = float(weight) · 2**(weight_scale - 127)``,
exact in float32 and bf16 (four significant bits times a power of two).
"""

from __future__ import annotations

import torch

from ..formats import FORMATS, NAMED_SCHEMES, Rounding, Scheme
from ..packing import MXPacked
from ..quantize import pow2, round_elements
from ..runtimes import ct_mx_exponent
from ._common import _blocks, _check_weight, _e8m0_multiplier, _need, _need_shape

MXFP8: Scheme = NAMED_SCHEMES["mxfp8"]
_E4M3 = FORMATS["fp8_e4m3"]
_BLOCK = 32


def _check(weight: torch.Tensor, weight_scale: torch.Tensor) -> None:
    _need("weight", weight, torch.float8_e4m3fn, 2)
    _need("weight_scale", weight_scale, torch.uint8, 2)
    k = weight.shape[-1]
    if k % _BLOCK:
        raise ValueError(f"weight: {k} elements per row is not a multiple of the block of {_BLOCK}")
    _need_shape("weight_scale", weight_scale, (*weight.shape[:-1], k // _BLOCK),
                f"one scale per {_BLOCK} elements of weight {tuple(weight.shape)}")


def decode_ct_mxfp8(weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """``mxfp8-quantized`` -> float32 weight [..., N, K]. Decoding, as the module docstring says the libraries do:
    ``float(weight) · 2**(weight_scale - 127)``; byte 255 is NaN here (OCP MX), ``2**128 = inf`` in the library."""
    _check(weight, weight_scale)
    values = _blocks(weight.to(torch.float32), _BLOCK)
    return (values * _e8m0_multiplier(weight_scale).unsqueeze(-1)).flatten(-2)


def encode_ct_mxfp8(w: torch.Tensor, weight_scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """A weight [..., N, K] -> ``weight`` (float8_e4m3fn) and ``weight_scale`` (uint8) as llm-compressor writes them:
    scales by compressed-tensors' ``generate_mx_scales`` (:func:`lm_eval_mx.numerics.runtimes.ct_mx_exponent`),
    elements ``w / 2**(s - 127)`` clamped to ±448 and rounded half-even to E4M3. Given ``weight_scale`` it inverts
    :func:`decode_ct_mxfp8`."""
    w = _check_weight(w, _BLOCK)
    blocks = _blocks(w.to(torch.float32), _BLOCK)
    if weight_scale is None:
        weight_scale = (ct_mx_exponent(blocks.abs().amax(-1), _E4M3) + 127).to(torch.uint8)
    e = weight_scale.to(torch.int32).clamp(max=254) - 127
    v = (blocks * pow2(-e).unsqueeze(-1)).clamp(-_E4M3.max_normal, _E4M3.max_normal)
    q = round_elements(v, _E4M3, Rounding.EVEN).flatten(-2)
    return {"weight": q.to(torch.float8_e4m3fn), "weight_scale": weight_scale}


def ct_mxfp8_to_packed(weight: torch.Tensor, weight_scale: torch.Tensor, scheme: Scheme = MXFP8) -> MXPacked:
    """``mxfp8-quantized`` -> :class:`MXPacked` (the E4M3 bytes are this project's ``fp8_e4m3`` codes, the E8M0
    bytes its scales): bit-identical values."""
    _check(weight, weight_scale)
    return MXPacked(weight.view(torch.uint8), weight_scale, weight.shape, scheme, _BLOCK)

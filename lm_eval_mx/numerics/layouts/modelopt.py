"""NVIDIA ModelOpt's NVFP4 export (``quant_algo: NVFP4``), as vLLM and TensorRT-LLM read it: exact decoder,
encoder as ModelOpt writes, conversion to :class:`MXPacked`.
"""

from __future__ import annotations

import torch

from ..packing import MXPacked
from ._common import (
    _E4M3_MAX_TIMES_FP4_MAX,
    _NVFP4_BLOCK,
    NVFP4,
    _blocks,
    _check_nvfp4,
    _check_weight,
    _fp4_lut,
    _need,
    _need_shape,
    _pack_codes,
    _per_tensor,
    _ts_for_packed,
    _unpack_codes,
    fp4_codes,
)

# ModelOpt NVFP4


def decode_modelopt_nvfp4(weight: torch.Tensor, weight_scale: torch.Tensor,
                          weight_scale_2: torch.Tensor) -> torch.Tensor:
    """ModelOpt NVFP4 export -> float32 weight [..., N, K].

    Stored: ``weight`` uint8 [N, K/2], ``weight_scale`` float8_e4m3fn [N, K/16], ``weight_scale_2`` float32
    (scalar or [1]) = ``amax(W) / (6·448)`` (a *divisor*: the reciprocal of compressed-tensors'
    ``weight_global_scale``); ``input_scale`` (float32, activations) is not needed for the weight.
    Decoding, as ``NVFP4QTensor.dequantize`` (ModelOpt, non-fast path) computes it:

    1. codes as :func:`decode_ct_nvfp4` step 1, except that ModelOpt's table maps code 8 to +0.0;
    2. ``eff = float32(weight_scale) · weight_scale_2``: one float32 product per block;
    3. ``W = value · eff`` in float32 (then cast to the requested dtype).

    This is this project's :data:`NVFP4` order (``value · (ts · s8)``), so :func:`modelopt_nvfp4_to_packed`
    is bit-exact.
    """
    ts = _check_modelopt_nvfp4(weight, weight_scale, weight_scale_2)
    values = _fp4_lut(False, weight.device)[_unpack_codes(weight)]
    eff = weight_scale.to(torch.float32) * ts
    return (_blocks(values, _NVFP4_BLOCK) * eff.unsqueeze(-1)).flatten(-2)


def _check_modelopt_nvfp4(weight: torch.Tensor, weight_scale: torch.Tensor,
                          weight_scale_2: torch.Tensor) -> torch.Tensor:
    return _check_nvfp4(("weight", "weight_scale", "weight_scale_2"), weight, weight_scale, weight_scale_2)


def modelopt_nvfp4_weight_scale_2(w: torch.Tensor) -> torch.Tensor:
    """ModelOpt's ``get_weights_scaling_factor_2``: ``float32(amax(w)) / 2688`` (float32 0-dim). On CPU one
    correctly rounded division, equal to this project's ``tensor_scale``; on CUDA torch multiplies by the
    rounded reciprocal of a Python divisor, as it does for ModelOpt itself there."""
    return w.abs().amax().float() / _E4M3_MAX_TIMES_FP4_MAX


def modelopt_nvfp4_block_scales(w: torch.Tensor, weight_scale_2: torch.Tensor) -> torch.Tensor:
    """ModelOpt's ``get_weights_scaling_factor``: ``amax_block / (6 · weight_scale_2)`` in float32 (the product
    rounded first), zeros replaced by 1.0, cast to float8_e4m3fn (nearest-even)."""
    amax = _blocks(w, _NVFP4_BLOCK).abs().amax(-1).float()
    ts = _per_tensor("weight_scale_2", weight_scale_2, tuple(w.shape[:-2])).squeeze(-1)
    s = amax / (6.0 * ts)  # the product rounded to float32 first
    return torch.where(s == 0, torch.ones_like(s), s).to(torch.float8_e4m3fn)


def encode_modelopt_nvfp4(w: torch.Tensor, weight_scale_2: torch.Tensor | None = None,
                          weight_scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """A weight [..., N, K] -> the ModelOpt NVFP4 tensors (``weight``, ``weight_scale``, ``weight_scale_2``),
    as ``NVFP4QTensor.quantize`` writes them: scales from :func:`modelopt_nvfp4_weight_scale_2` and
    :func:`modelopt_nvfp4_block_scales` unless given; elements ``w / (float32(weight_scale) ·
    weight_scale_2)`` (float32) rounded nearest-even on E2M1 (ModelOpt's ``_cast_fp4``, :func:`fp4_codes`).

    Given the stored scales it inverts :func:`decode_modelopt_nvfp4` exactly (as :func:`encode_ct_nvfp4`:
    code 8 comes back as 0, a zero-scale block as codes 0). Against this project's
    :data:`NVFP4` (same ``ts``): the block scale is ``amax/(6·ts)`` instead of ``(amax/6)/ts`` and the
    elements are divided by ``s8·ts`` instead of multiplied by ``(1/ts)/s8``, so an element or a scale lands
    on the other side of a rounding boundary now and then; a zero block's scale is 1.0 instead of 0.
    """
    w = _check_weight(w, _NVFP4_BLOCK)
    ts = modelopt_nvfp4_weight_scale_2(w) if weight_scale_2 is None else weight_scale_2
    s8 = modelopt_nvfp4_block_scales(w, ts) if weight_scale is None else weight_scale
    _need("weight_scale", s8, torch.float8_e4m3fn, 2)
    _need_shape("weight_scale", s8, (*w.shape[:-1], w.shape[-1] // _NVFP4_BLOCK), "one scale per 16 elements")
    t = _per_tensor("weight_scale_2", ts, tuple(w.shape[:-2]))
    eff = (s8.to(torch.float32) * t).unsqueeze(-1)
    scaled = torch.where(eff == 0, 0.0, _blocks(w, _NVFP4_BLOCK) / eff).flatten(-2)  # a zero scale: code 0
    return {"weight": _pack_codes(fp4_codes(scaled)), "weight_scale": s8, "weight_scale_2": ts}


def modelopt_nvfp4_to_packed(weight: torch.Tensor, weight_scale: torch.Tensor,
                             weight_scale_2: torch.Tensor) -> MXPacked:
    """ModelOpt NVFP4 -> :class:`MXPacked` (scheme :data:`NVFP4`): codes and scale bytes as they are,
    ``tensor_scale = weight_scale_2``. Bit-exact: both multiply ``value · (s8 · ts)`` in float32."""
    lead = tuple(weight.shape[:-2])
    ts = _ts_for_packed(_check_modelopt_nvfp4(weight, weight_scale, weight_scale_2), lead)
    k = weight.shape[-1] * 2
    return MXPacked(weight, weight_scale.view(torch.uint8), torch.Size((*weight.shape[:-1], k)), NVFP4,
                    _NVFP4_BLOCK, ts)


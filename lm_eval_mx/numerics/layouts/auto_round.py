"""auto-round's NVFP4 in its ``auto_round:llm_compressor`` packing: compressed-tensors' tensors, auto-round's decoding.

Stored per layer as compressed-tensors ``nvfp4-pack-quantized`` (``weight_packed`` uint8 [N, K/2], ``weight_scale``
float8_e4m3fn [N, K/16], ``weight_global_scale`` float32 [1] = ``448·6 / amax(W)``). auto-round 0.16.1 decodes it
(``experimental/qmodules/nvfp4.py: NVFP4QuantLinear._dequant_nvfp4_tensor``) in another order than
compressed-tensors:

1. codes as compressed-tensors' (``fp4_utils.py: unpack_fp4_from_uint8``; code 8 is -0.0);
2. ``value · r`` with ``r = 1 / weight_global_scale`` (float32, 0 for a zero global scale): one rounding per element;
3. times ``float32(weight_scale)`` of its block: a second rounding.

:func:`ar_nvfp4_to_packed` keeps the bytes with ``ts = r`` (this project's ``value · (ts · s8)``): equal to step 2-3
wherever the value is a power of two (±0.5, 1, 2, 4) or zero; for ±1.5, 3, 6 the two orders may differ in the
last one or two float32 ulps (see docs: measured on auto-round's own checkpoint).
"""

from __future__ import annotations

import torch

from ..formats import FORMATS, Rounding
from ..packing import MXPacked
from ..quantize import round_elements
from ._common import NVFP4, _blocks, _fp4_lut, _pack_codes, _ts_for_packed, _unpack_codes, fp4_codes
from .compressed_tensors import _check_ct_nvfp4

_BLOCK = 16


def _reciprocal(gs: torch.Tensor) -> torch.Tensor:
    return torch.where(gs == 0, torch.zeros_like(gs), 1.0 / gs)  # auto-round's get_reciprocal


def decode_ar_nvfp4(weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                    weight_global_scale: torch.Tensor) -> torch.Tensor:
    """auto-round NVFP4 -> float32 weight [..., N, K]. Decoding as auto-round computes it (module docstring, steps
    1-3): ``(value · (1/gs)) · s8``."""
    gs = _check_ct_nvfp4(weight_packed, weight_scale, weight_global_scale)
    values = _fp4_lut(True, weight_packed.device)[_unpack_codes(weight_packed)]
    scaled = _blocks(values, _BLOCK) * _reciprocal(gs).unsqueeze(-1)
    return (scaled * weight_scale.to(torch.float32).unsqueeze(-1)).flatten(-2)


def encode_ar_nvfp4(w: torch.Tensor, weight_global_scale: torch.Tensor,
                    weight_scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """A weight and its stored scales -> the packed codes as auto-round's ``QuantLinear.pack``
    (``export/export_to_autoround/qlinear_fp.py``) writes them: ``w · (1 / (s8 · (1/gs)))`` clamped to ±6, rounded
    half-even on E2M1 (``cast_to_fp4``). auto-round chooses the scales while tuning, so they are required."""
    gs = _check_ct_nvfp4(torch.zeros((*w.shape[:-1], w.shape[-1] // 2), dtype=torch.uint8), weight_scale,
                         weight_global_scale)
    eff = weight_scale.to(torch.float32) * _reciprocal(gs)
    o = torch.where(eff == 0, torch.zeros_like(eff), 1.0 / eff)
    v = round_elements((_blocks(w.to(torch.float32), _BLOCK) * o.unsqueeze(-1)).clamp(-6.0, 6.0),
                       FORMATS["fp4_e2m1"], Rounding.EVEN)
    return {"weight_packed": _pack_codes(fp4_codes(v.flatten(-2))), "weight_scale": weight_scale,
            "weight_global_scale": weight_global_scale}


def ar_nvfp4_to_packed(weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                       weight_global_scale: torch.Tensor) -> MXPacked:
    """auto-round NVFP4 -> :class:`MXPacked` (scheme NVFP4), bytes as they are, ``ts = 1/weight_global_scale``."""
    lead = tuple(weight_packed.shape[:-2])
    gs = _check_ct_nvfp4(weight_packed, weight_scale, weight_global_scale)
    k = weight_packed.shape[-1] * 2
    return MXPacked(weight_packed, weight_scale.view(torch.uint8), torch.Size((*weight_packed.shape[:-1], k)),
                    NVFP4, _BLOCK, _ts_for_packed(_reciprocal(gs), lead))

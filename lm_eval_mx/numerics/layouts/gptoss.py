"""OpenAI gpt-oss MoE experts (``*_blocks``/``*_scales``), as transformers' Mxfp4 integration reads them.
"""

from __future__ import annotations

import torch

from ..formats import Scheme
from ..packing import MXPacked
from ._common import (
    _MX_BLOCK,
    MXFP4,
    _check_mx_scheme,
    _e8m0_multiplier,
    _fp4_lut,
    _need,
    _need_shape,
    _unpack_codes,
    encode_e8m0_fp4,
)

# gpt-oss MXFP4 (transformers' Mxfp4 integration)


def decode_gptoss_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """gpt-oss ``*_blocks`` / ``*_scales`` -> float32 weight [..., N, K], quantized along K.

    Stored: ``blocks`` uint8 [..., N, K/32, 16] (the experts' [E, N, K/32, 16]: 16 bytes = 32 codes per
    block), ``scales`` uint8 [..., N, K/32], a biased E8M0 exponent. Decoding, as transformers'
    ``convert_moe_packed_tensors`` computes it:

    1. codes as :func:`decode_ct_nvfp4` step 1 (its table ``FP4_VALUES`` keeps -0.0 for code 8);
    2. ``W = ldexp(value, scales - 127)``: exact;
    3. transformers then transposes to [E, K, N] (``GptOssExperts`` multiplies ``x @ W``); this returns the
       [..., N, K] orientation the weights are quantized in (``decode(...).transpose(-1, -2)`` is theirs).

    Byte 255 decodes to NaN (OCP MX); transformers' ``ldexp`` gives ``±inf`` (NaN for code 0) there.
    """
    _check_gptoss_mxfp4(blocks, scales)
    values = _fp4_lut(True, blocks.device)[_unpack_codes(blocks)]  # [..., N, G, 32]
    return (values * _e8m0_multiplier(scales).unsqueeze(-1)).flatten(-2)


def _check_gptoss_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> None:
    _need("blocks", blocks, torch.uint8, 3)
    _need("scales", scales, torch.uint8, 2)
    if blocks.shape[-1] != _MX_BLOCK // 2:
        raise ValueError(f"blocks: expected shape [..., N, K/32, 16] (16 bytes per block of 32), got "
                         f"{tuple(blocks.shape)}")
    _need_shape("scales", scales, tuple(blocks.shape[:-1]), f"one scale per block of blocks {tuple(blocks.shape)}")


def encode_gptoss_mxfp4(w: torch.Tensor, scheme: Scheme = MXFP4,
                        scales: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """A weight [..., N, K] -> gpt-oss ``blocks`` [..., N, K/32, 16] and ``scales`` [..., N, K/32].

    OpenAI's quantizer (triton_kernels' ``downcast_to_mxfp``) is not a torch reference available here, so the
    scales are this project's: ``scheme`` (OCP MX :data:`MXFP4` by default; ``scale_mode`` picks the
    exponent rule), and the values equal ``quantize_torch(w, scheme)``. Given ``scales`` it inverts
    :func:`decode_gptoss_mxfp4` exactly.
    """
    _check_mx_scheme(scheme)
    blocks, scales = encode_e8m0_fp4(w, scheme, scales, "scales")
    return {"blocks": blocks, "scales": scales}


def gptoss_mxfp4_to_packed(blocks: torch.Tensor, scales: torch.Tensor, scheme: Scheme = MXFP4) -> MXPacked:
    """gpt-oss MXFP4 -> :class:`MXPacked` [..., N, K]: the bytes as they are (``blocks`` flattened to
    [..., N, K/2]); bit-identical values."""
    _check_gptoss_mxfp4(blocks, scales)
    _check_mx_scheme(scheme)
    codes = blocks.flatten(-2)
    return MXPacked(codes, scales, torch.Size((*codes.shape[:-1], codes.shape[-1] * 2)), scheme, _MX_BLOCK)


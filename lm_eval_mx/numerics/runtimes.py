"""Activation quantization as shipped checkpoints' own runtimes compute it, operation for operation.

hf-mx evaluates a shipped checkpoint's inputs as the tool that wrote it does. Where a tool's arithmetic is not one of
this project's schemes (:mod:`.quantize`), it is reproduced here, each function transcribing the tool's source with
the same float32 operations in the same order (tensors in, tensors out; the tools are not imported):

* :func:`autoround_mx`: auto-round's MX activations (``quant_mx``): the shared exponent is
  ``floor(torch.log2(amax))`` in float32, which for a block maximum a few float32 ulps below a power of two rounds
  up (OCP's floor takes the exponent bits: :data:`~.formats.ScaleMode.FLOOR`), and a scale above 2**127 is clamped,
  not NaN (the exponent is :func:`~.quantize.log2_exponent`, which ``scale_mode=log2`` computes too);
* :func:`autoround_nvfp4`: auto-round's NVFP4 activations with the stored ``input_global_scale`` (``gs``, a
  multiplier): block scale ``e4m3(gs · (bmax · (1/6)))``, elements ``x · (1 / (s · (1/gs)))``, dequantized by
  the reciprocal of that, each step one float32 rounding;
* :func:`ct_mx`: compressed-tensors' dynamic MX activations (MXFP4 and MXFP8): the block maximum ``m · 2**k``
  (``1 <= m < 2``) taken as ``2**(k+1)`` when ``m >= 1.75``, else ``2**k`` (``round_to_power_2``: ``1 << 21`` added
  to the float32 bits, the mantissa cleared, for every element format), then its exponent minus the element's emax.
  For MXFP4 this is :data:`~.formats.ScaleMode.EVEN`; for MXFP8 no scale mode of this project (EVEN rounds up from
  ``m >= 1.9375``, RCEIL from ``m > 1.75``: they differ from it where a block's small elements fall in E4M3's
  subnormal range).

:data:`RULES` names them for :class:`lm_eval_mx.nn.spec.MXSpec` (``a_rule``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .formats import FORMATS, ElemFormat, Rounding, Scheme
from .quantize import log2_exponent, pow2, round_elements

_E2M1_MAX = 6.0
_E4M3 = FORMATS["fp8_e4m3"]
_F32_MANT = 23


def _groups(x: torch.Tensor, block: int) -> tuple[torch.Tensor, int]:
    """float32 [rows, block] groups along the last axis, the last zero-padded (auto-round's
    ``reshape_pad_tensor_by_group_size``, compressed-tensors' group reshape), and the pad length."""
    t = x.reshape(-1, x.shape[-1]).to(torch.float32)
    pad = -t.shape[-1] % block
    if pad:
        t = torch.nn.functional.pad(t, (0, pad))
    return t.reshape(-1, block), pad


def _ungroup(q: torch.Tensor, x: torch.Tensor, pad: int) -> torch.Tensor:
    q = q.reshape(-1, x.shape[-1] + pad)
    return q[:, : x.shape[-1]].reshape(x.shape).to(x.dtype)


def _mx_elements(t: torch.Tensor, exp: torch.Tensor, fmt: ElemFormat) -> torch.Tensor:
    """Elements ``t / 2**exp`` clamped to ±max and rounded half-even (subnormals kept), times ``2**exp``: exact
    power-of-two steps, as both tools compute them."""
    scale = pow2(exp.to(torch.int32))
    v = (t / scale).clamp(-fmt.max_normal, fmt.max_normal)
    return round_elements(v, fmt, Rounding.EVEN) * scale


def autoround_mx(x: torch.Tensor, fmt: ElemFormat, block: int = 32) -> torch.Tensor:
    """auto-round 0.16.1's dynamic MX activation (``auto_round/data_type/mxfp.py: quant_mx``, called by
    ``experimental/qmodules/mx.py: MXQuantLinearBase.qdq_input``), in float32, returned in ``x``'s dtype:

    1. groups of ``block`` along the last axis (the last zero-padded), ``amax`` = max |x| of each;
    2. ``e = floor(torch.log2(amax))`` (``amax == 0``: ``log2`` replaced by 1), minus the element's emax, clamped to
       [-127, 127];
    3. ``x / 2**e`` clamped to ±max, rounded half-even on the element grid (``quant_element``: private exponent
       ``floor(log2|v|)`` clipped at the smallest normal; its float32 ``log2`` moves no result), times ``2**e``.
    """
    t, pad = _groups(x, block)
    e = log2_exponent(t.abs().amax(-1, keepdim=True), fmt)  # scale_mode=log2's exponent: one definition
    return _ungroup(_mx_elements(t, e, fmt), x, pad)


def ct_mx(x: torch.Tensor, fmt: ElemFormat, block: int = 32) -> torch.Tensor:
    """compressed-tensors 0.19's dynamic MX activation (``quantization/utils/mxfp_utils.py: generate_mx_scales``,
    ``round_to_power_2``; ``lifecycle/forward.py: _quantize``), returned in ``x``'s dtype:

    1. groups of ``block`` along the last axis, ``amax`` = max |x| of each (exact in float32 for any input dtype);
    2. ``amax`` to a power of two: its float32 bits plus ``1 << 21``, mantissa cleared (up from a mantissa of
       1.75), whatever the element format; ``e`` its exponent minus the element's emax (2 for E2M1, 8 for E4M3),
       clamped to [-127, 127] (the uint8 E8M0 byte);
    3. elements as :func:`autoround_mx` step 3.
    """
    t, pad = _groups(x, block)
    e = ct_mx_exponent(t.abs().amax(-1, keepdim=True), fmt)
    return _ungroup(_mx_elements(t, e, fmt), x, pad)


def ct_mx_exponent(amax: torch.Tensor, fmt: ElemFormat) -> torch.Tensor:
    """compressed-tensors' E8M0 exponent (unbiased, int32) of float32 block maxima (``generate_mx_scales``): ``amax``
    to a power of two, up from a mantissa of 1.75, its exponent minus ``fmt``'s emax, clamped to [-127, 127]."""
    bits = (amax.view(torch.int32) + (1 << (_F32_MANT - FORMATS["fp4_e2m1"].mbits - 1))) & 0x7F800000
    return ((bits >> _F32_MANT) - 127 - fmt.emax).clamp(-127, 127)


def autoround_nvfp4(x: torch.Tensor, input_global_scale: float | torch.Tensor) -> torch.Tensor:
    """auto-round 0.16.1's NVFP4 activation with the stored ``input_global_scale`` ``gs`` (a multiplier:
    ``448·6 / calibrated amax``), as ``experimental/qmodules/nvfp4.py: NVFP4QuantLinear.qdq_input`` computes it
    (``data_type/nvfp.py: ref_nvfp4_quant``, ``cast_to_fp4``), in float32, returned in ``x``'s dtype:

    1. groups of 16 along the last axis, ``bmax`` = max |x| of each;
    2. block scale ``s = e4m3(clamp(gs · (bmax · float32(1/6)), ±448))`` (nearest-even, a zero block's scale 0);
    3. ``o = 1 / (s · (1/gs))`` (0 where ``s · (1/gs)`` is 0): the global scale enters as its float32 reciprocal,
       then the product is inverted;
    4. elements ``x · o`` clamped to ±6, rounded half-even on E2M1; dequantized ``q · (1/o)``.

    This project's static NVFP4 multiplies ``q · (ts · s)`` with ``s = e4m3((bmax/6)/ts)``: other roundings.
    """
    gs = torch.as_tensor(input_global_scale, dtype=torch.float32, device=x.device).reshape(1)
    t, pad = _groups(x, 16)
    bmax = t.abs().amax(-1, keepdim=True)
    s = gs * (bmax * (1.0 / _E2M1_MAX))
    s = round_elements(s.clamp(-_E4M3.max_normal, _E4M3.max_normal), _E4M3, Rounding.EVEN)
    r = torch.where(gs == 0, torch.zeros_like(gs), 1.0 / gs)
    d = s * r
    o = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    q = round_elements((t * o).clamp(-_E2M1_MAX, _E2M1_MAX), FORMATS["fp4_e2m1"], Rounding.EVEN)
    return _ungroup(q * torch.where(o == 0, torch.zeros_like(o), 1.0 / o), x, pad)


def _mx_rule(fn: Callable[..., torch.Tensor]) -> Callable[[torch.Tensor, Scheme, float | None], torch.Tensor]:
    return lambda x, scheme, _static: fn(x, scheme.elem, scheme.block_size)


def _nvfp4_rule(x: torch.Tensor, scheme: Scheme, static: float | None) -> torch.Tensor:
    if static is None:
        raise ValueError("auto-round's NVFP4 activations take the stored input_global_scale; none was given")
    return autoround_nvfp4(x, static)


# name -> (input, the layer's activation Scheme, its stored per-tensor value as stored) -> quantized input
RULES: dict[str, Callable[[torch.Tensor, Scheme, float | None], torch.Tensor]] = {
    "auto-round-mx": _mx_rule(autoround_mx),
    "auto-round-nvfp4": _nvfp4_rule,
    "compressed-tensors-mx": _mx_rule(ct_mx),
}


def get_rule(name: str) -> Callable[[torch.Tensor, Scheme, float | None], torch.Tensor]:
    if name not in RULES:
        raise ValueError(f"unknown activation rule {name!r}; known: {', '.join(RULES)}")
    return RULES[name]

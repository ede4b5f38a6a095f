"""compressed-tensors ``nvfp4-pack-quantized`` and ``mxfp4-pack-quantized`` (llm-compressor's NVFP4 and MXFP4
checkpoints): exact decoders, encoders as the library writes, conversion to :class:`MXPacked`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..formats import Scheme
from ..packing import MXPacked
from ._common import (
    _E4M3_MAX_TIMES_FP4_MAX,
    _MX_BLOCK,
    _NVFP4_BLOCK,
    CT_MXFP4,
    NVFP4,
    _blocks,
    _check_fp4_pair,
    _check_mx_scheme,
    _check_nvfp4,
    _check_weight,
    _e8m0_multiplier,
    _fp4_lut,
    _need,
    _need_shape,
    _pack_codes,
    _per_tensor,
    _ts_for_packed,
    _unpack_codes,
    encode_e8m0_fp4,
    fp4_codes,
)

# compressed-tensors NVFP4 (nvfp4-pack-quantized)


def decode_ct_nvfp4(weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                    weight_global_scale: torch.Tensor) -> torch.Tensor:
    """compressed-tensors ``nvfp4-pack-quantized`` -> float32 weight [..., N, K].

    Stored: ``weight_packed`` uint8 [N, K/2], ``weight_scale`` float8_e4m3fn [N, K/16],
    ``weight_global_scale`` float32 [1] = ``448·6 / amax(W)`` (a *multiplier* of the block scales; the
    reciprocal of ModelOpt's ``weight_scale_2``). Decoding, as ``NVFP4PackedCompressor.decompress`` and
    ``dequantize`` compute it (compressed-tensors 0.20):

    1. codes: byte ``b`` holds element ``2j`` in ``b & 0xF`` and ``2j+1`` in ``b >> 4``; value
       ``(-1)**bit3 · [0, .5, 1, 1.5, 2, 3, 4, 6][bits 0-2]`` (code 8 is -0.0);
    2. ``eff = float32(weight_scale) / weight_global_scale``: one correctly rounded float32 division per
       block (the library upcasts the E4M3 scale, exactly, and divides by the [1]-shaped float32 tensor);
    3. ``W = value · eff`` in float32 (the library then rounds this to bf16, its default dtype).

    Not this project's order: :data:`NVFP4` multiplies ``value · (ts · s8)`` with ``ts = amax/2688``; see
    :func:`ct_nvfp4_to_packed` for when the two agree bit for bit.
    """
    gs = _check_ct_nvfp4(weight_packed, weight_scale, weight_global_scale)
    values = _fp4_lut(True, weight_packed.device)[_unpack_codes(weight_packed)]
    eff = weight_scale.to(torch.float32) / gs
    return (_blocks(values, _NVFP4_BLOCK) * eff.unsqueeze(-1)).flatten(-2)


def _check_ct_nvfp4(weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                    weight_global_scale: torch.Tensor) -> torch.Tensor:
    return _check_nvfp4(("weight_packed", "weight_scale", "weight_global_scale"), weight_packed, weight_scale,
                        weight_global_scale)


def ct_nvfp4_global_scale(w: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' ``generate_gparam`` for a weight: ``2688 / max(amax(w), tiny)`` evaluated in
    ``w``'s dtype as torch does ``float / tensor`` (``reciprocal(amax) · 2688``, two roundings), NaN/inf
    replaced by 1, then float32 [1]."""
    amax = w.abs().amax()
    amax = amax.clamp(min=torch.finfo(amax.dtype).tiny)
    gs = _E4M3_MAX_TIMES_FP4_MAX / amax
    return torch.nan_to_num(gs, nan=1.0, posinf=1.0, neginf=1.0).to(torch.float32).reshape(1)


def ct_nvfp4_block_scales(w: torch.Tensor, weight_global_scale: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' NVFP4 block scales (``calculate_qparams``): ``amax_block / 6`` in ``w``'s dtype,
    times the float32 global scale, rounded to E4M3 (nearest-even, clamped to ±448); a zero scale becomes
    0.125 (E4M3's eps). float8_e4m3fn [..., N, K/16]."""
    amax = _blocks(w, _NVFP4_BLOCK).abs().amax(-1)
    s = amax / torch.tensor(6.0, dtype=amax.dtype)  # in w's dtype, as the observer's min/max are
    s = _per_tensor("weight_global_scale", weight_global_scale, tuple(w.shape[:-2])) * s  # float32 product
    s = s.clamp(-448.0, 448.0).to(torch.float8_e4m3fn).to(s.dtype)
    return torch.where(s == 0, torch.tensor(0.125, dtype=s.dtype), s).to(torch.float8_e4m3fn)


def encode_ct_nvfp4(w: torch.Tensor, weight_global_scale: torch.Tensor | None = None,
                    weight_scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """A weight [..., N, K] -> the compressed-tensors NVFP4 tensors (``weight_packed``, ``weight_scale``,
    ``weight_global_scale``), as llm-compressor's min-max observer and ``NVFP4PackedCompressor.compress``
    write them: scales from :func:`ct_nvfp4_global_scale` and :func:`ct_nvfp4_block_scales` unless given;
    elements ``w / (float32(weight_scale) / weight_global_scale)`` (float32), clamped to ±6, rounded
    nearest-even on E2M1 (:func:`fp4_codes`).

    Given the stored scales it inverts :func:`decode_ct_nvfp4` exactly (code 8, -0, comes back as code 0,
    and a block whose scale is 0, which decodes to zeros whatever its codes, as codes 0; the library never
    writes a zero scale).
    Against this project's :data:`NVFP4` the values differ in the last float32 bits of the scales (a
    reciprocal global scale, ``(amax/6)·gs`` instead of ``(amax/6)/ts``, a zero block's scale 0.125 instead
    of 0), which moves an element across a rounding boundary now and then.
    """
    w = _check_weight(w, _NVFP4_BLOCK)
    gs = ct_nvfp4_global_scale(w) if weight_global_scale is None else weight_global_scale
    s8 = ct_nvfp4_block_scales(w, gs) if weight_scale is None else weight_scale
    _need("weight_scale", s8, torch.float8_e4m3fn, 2)
    _need_shape("weight_scale", s8, (*w.shape[:-1], w.shape[-1] // _NVFP4_BLOCK), "one scale per 16 elements")
    g = _per_tensor("weight_global_scale", gs, tuple(w.shape[:-2]))
    eff = (s8.to(torch.float32) / g).unsqueeze(-1)
    scaled = torch.where(eff == 0, 0.0, _blocks(w, _NVFP4_BLOCK) / eff).flatten(-2)  # a zero scale: code 0
    return {"weight_packed": _pack_codes(fp4_codes(scaled.clamp(-6.0, 6.0))), "weight_scale": s8,
            "weight_global_scale": gs}


def ct_nvfp4_to_packed(weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                       weight_global_scale: torch.Tensor, *, exact: bool = True) -> MXPacked:
    """compressed-tensors NVFP4 -> this project's :class:`MXPacked` (scheme :data:`NVFP4`), codes and scale
    bytes copied as they are.

    The library multiplies by ``s8 / gs``, :data:`NVFP4` by ``ts · s8``. A float32 ``ts`` with
    ``ts · s8 == s8 / gs`` for every E4M3 value present is searched among ``1/gs`` and its float32
    neighbours (always found when ``gs`` is a power of two, often otherwise); with it
    :func:`~lm_eval_mx.numerics.packing.unpack_mx` gives :func:`decode_ct_nvfp4`'s values (zeros as +0.0). Without
    one, ``exact=True`` raises ``ValueError``; ``exact=False`` keeps ``ts = 1/gs`` (some scales then differ
    from the library's in the last float32 bit).
    """
    lead = tuple(weight_packed.shape[:-2])
    gs = _check_ct_nvfp4(weight_packed, weight_scale, weight_global_scale).reshape(-1)
    s8 = weight_scale.to(torch.float32).reshape(gs.numel(), -1)
    ts = torch.empty_like(gs)
    for i in range(gs.numel()):
        used = torch.unique(s8[i])
        used = used[torch.isfinite(used)]
        found = nearby_reciprocal(gs[i], lambda t, g=gs[i], u=used: torch.equal(t * u, u / g))
        if found is None:
            if exact:
                raise ValueError(
                    f"weight_global_scale {gs[i].item()!r}: no float32 ts makes ts·s8 equal the library's "
                    f"s8/weight_global_scale for every block scale present; pass exact=False to accept "
                    f"ts = 1/weight_global_scale (last-bit differences)")
            found = 1.0 / gs[i]
        ts[i] = found
    k = weight_packed.shape[-1] * 2
    return MXPacked(weight_packed, weight_scale.view(torch.uint8), torch.Size((*weight_packed.shape[:-1], k)),
                    NVFP4, _NVFP4_BLOCK, _ts_for_packed(ts, lead))


def nearby_reciprocal(x: torch.Tensor, ok: Callable[[torch.Tensor], bool]) -> torch.Tensor | None:
    """The first of float32 ``1/x`` and its neighbours within two ulps for which ``ok`` holds, or None: how a
    per-tensor scale is carried between compressed-tensors' divisor ``gs`` (``s8 / gs``) and this project's
    multiplier ``ts`` (``ts · s8``), both ways (reading here, writing in ``algorithms.export_ct``)."""
    t0 = 1.0 / x
    candidates = [t0]
    for direction in (float("inf"), float("-inf")):
        t = t0
        for _ in range(2):
            t = torch.nextafter(t, torch.tensor(direction))
            candidates.append(t)
    return next((t for t in candidates if ok(t)), None)


# ----------------------------------------------------------------------------------------------------------
# compressed-tensors MXFP4 (mxfp4-pack-quantized)


def decode_ct_mxfp4(weight_packed: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """compressed-tensors ``mxfp4-pack-quantized`` -> float32 weight [..., N, K].

    Stored: ``weight_packed`` uint8 [N, K/2] (as NVFP4), ``weight_scale`` uint8 [N, K/32], a biased E8M0
    exponent; no global scale. Decoding, as ``MXFP4PackedCompressor.decompress`` computes it:

    1. codes as :func:`decode_ct_nvfp4` step 1;
    2. block scale ``2**(weight_scale - 127)`` (the library evaluates ``2.0 ** bf16(s - 127)``, exact);
    3. ``W = value · scale``: exact in float32 and in bf16 (two significant bits times a power of two).

    Byte 255 decodes to NaN here (OCP MX's NaN scale); the library computes ``2**128 = inf`` there.
    Same values as :data:`CT_MXFP4` / :data:`MXFP4` packing; see :func:`ct_mxfp4_to_packed`.
    """
    _check_ct_mxfp4(weight_packed, weight_scale)
    values = _fp4_lut(True, weight_packed.device)[_unpack_codes(weight_packed)]
    return (_blocks(values, _MX_BLOCK) * _e8m0_multiplier(weight_scale).unsqueeze(-1)).flatten(-2)


def _check_ct_mxfp4(weight_packed: torch.Tensor, weight_scale: torch.Tensor) -> None:
    _need("weight_packed", weight_packed, torch.uint8, 2)
    _need("weight_scale", weight_scale, torch.uint8, 2)
    _check_fp4_pair("weight_packed", weight_packed, "weight_scale", weight_scale, _MX_BLOCK)


def encode_ct_mxfp4(w: torch.Tensor, weight_scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """A weight [..., N, K] -> compressed-tensors MXFP4 tensors (``weight_packed``, ``weight_scale``).

    Scales as compressed-tensors' ``generate_mx_scales``: the block maximum rounded half-up to a power of
    two at E2M1's mantissa, its exponent minus 2 (floor(log2 6)), clamped to 0..255: this project's
    ``scale_mode=even`` (:data:`CT_MXFP4`), bit for bit. Elements: ``w / 2**(s-127)`` rounded
    nearest-even on E2M1, saturating. The values equal ``quantize_torch(w, CT_MXFP4)`` (zeros aside: a small
    negative value is stored as -0, code 8). Given ``weight_scale`` it inverts :func:`decode_ct_mxfp4`.
    """
    codes, weight_scale = encode_e8m0_fp4(w, CT_MXFP4, weight_scale, "weight_scale")
    return {"weight_packed": codes.flatten(-2), "weight_scale": weight_scale}


def ct_mxfp4_to_packed(weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                       scheme: Scheme = CT_MXFP4) -> MXPacked:
    """compressed-tensors MXFP4 -> :class:`MXPacked`, bytes as they are (the same codes, the same E8M0
    bytes, 255 = NaN block): bit-identical values. ``scheme`` records how the scales were chosen
    (:data:`CT_MXFP4` for llm-compressor's); any fp4_e2m1 block-32 E8M0 scheme stores the same way."""
    _check_ct_mxfp4(weight_packed, weight_scale)
    _check_mx_scheme(scheme)
    k = weight_packed.shape[-1] * 2
    return MXPacked(weight_packed, weight_scale, torch.Size((*weight_packed.shape[:-1], k)), scheme, _MX_BLOCK)


"""The packed FP4 weight layouts shipped checkpoints use: exact decoders, encoders, and their ``Scheme``.

Four layouts, each defined once here (a :class:`Layout` in :data:`LAYOUTS` and its functions):

* ``ct-nvfp4``: compressed-tensors ``nvfp4-pack-quantized`` (llm-compressor's NVFP4 checkpoints);
* ``ct-mxfp4``: compressed-tensors ``mxfp4-pack-quantized`` (E8M0 exponents stored as uint8);
* ``modelopt-nvfp4``: NVIDIA ModelOpt's NVFP4 export (``quant_algo: NVFP4``), as vLLM and TensorRT-LLM read it;
* ``gptoss-mxfp4``: OpenAI gpt-oss MoE experts (``*_blocks``/``*_scales``), as transformers reads them.

All four store FP4 E2M1 codes two to a byte, the element of even index in the low nibble, a code being
sign (bit 3) and magnitude index (bits 0-2) into ``0, 0.5, 1, 1.5, 2, 3, 4, 6`` (this project's
:func:`lm_eval_mx.numerics.packing.code_table` for ``fp4_e2m1``). They differ in the block scales and in how the
per-tensor scale enters. Every decoder returns float32 and reproduces its library's float32 arithmetic
operation for operation, so that its result equals the library's bit for bit (the library's own bf16
output is this float32 result rounded to bf16). The encoders reproduce what the library writes for a
high-precision weight, and, given the stored scales, are the exact inverse of the decoders.

Only ``.formats``, ``.numerics``, ``.packing`` and torch are imported: nothing here needs the libraries.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from .formats import FORMATS, NAMED_SCHEMES, Rounding, ScaleMode, Scheme
from .packing import MXPacked, _encode, code_table
from .quantize import pow2, quantize_blocks, round_elements

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


# ----------------------------------------------------------------------------------------------------------
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
    _need("weight_packed", weight_packed, torch.uint8, 2)
    _need("weight_scale", weight_scale, torch.float8_e4m3fn, 2)
    _check_fp4_pair("weight_packed", weight_packed, "weight_scale", weight_scale, _NVFP4_BLOCK)
    return _per_tensor("weight_global_scale", weight_global_scale, tuple(weight_packed.shape[:-2]))


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
        found = _exact_reciprocal(gs[i], used)
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


def _exact_reciprocal(gs: torch.Tensor, s8: torch.Tensor) -> torch.Tensor | None:
    want = s8 / gs
    t0 = 1.0 / gs
    candidates = [t0]
    for direction in (float("inf"), float("-inf")):
        t = t0
        for _ in range(2):
            t = torch.nextafter(t, torch.tensor(direction))
            candidates.append(t)
    for t in candidates:
        if torch.equal(t * s8, want):
            return t
    return None


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
    w = _check_weight(w, _MX_BLOCK)
    blocks = _blocks(w.to(torch.float32), _MX_BLOCK)
    if weight_scale is None:
        _, _, nan, exp = quantize_blocks(blocks, CT_MXFP4)
        weight_scale = torch.where(nan, _E8M0_NAN, exp + 127).squeeze(-1).to(torch.uint8)
    _need("weight_scale", weight_scale, torch.uint8, 2)
    _need_shape("weight_scale", weight_scale, blocks.shape[:-1], "one scale per 32 elements")
    scaled = blocks * pow2(127 - weight_scale.to(torch.int32).clamp(max=254)).unsqueeze(-1)  # exact
    scaled = scaled.masked_fill((weight_scale == _E8M0_NAN).unsqueeze(-1), 0.0)
    return {"weight_packed": _pack_codes(fp4_codes(scaled.flatten(-2))), "weight_scale": weight_scale}


def ct_mxfp4_to_packed(weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                       scheme: Scheme = CT_MXFP4) -> MXPacked:
    """compressed-tensors MXFP4 -> :class:`MXPacked`, bytes as they are (the same codes, the same E8M0
    bytes, 255 = NaN block): bit-identical values. ``scheme`` records how the scales were chosen
    (:data:`CT_MXFP4` for llm-compressor's); any fp4_e2m1 block-32 E8M0 scheme stores the same way."""
    _check_ct_mxfp4(weight_packed, weight_scale)
    _check_mx_scheme(scheme)
    k = weight_packed.shape[-1] * 2
    return MXPacked(weight_packed, weight_scale, torch.Size((*weight_packed.shape[:-1], k)), scheme, _MX_BLOCK)


def _check_mx_scheme(scheme: Scheme) -> None:
    if scheme.elem != FP4 or scheme.block_size != _MX_BLOCK or not scheme.is_mx or scheme.scale_bits != 8:
        raise ValueError(f"scheme: expected fp4_e2m1 with block 32 and 8-bit E8M0 scales, got {scheme.name}")


# ----------------------------------------------------------------------------------------------------------
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
    _need("weight", weight, torch.uint8, 2)
    _need("weight_scale", weight_scale, torch.float8_e4m3fn, 2)
    _check_fp4_pair("weight", weight, "weight_scale", weight_scale, _NVFP4_BLOCK)
    return _per_tensor("weight_scale_2", weight_scale_2, tuple(weight.shape[:-2]))


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


# ----------------------------------------------------------------------------------------------------------
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
    w = _check_weight(w, _MX_BLOCK)
    b = _blocks(w.to(torch.float32), _MX_BLOCK)
    if scales is None:
        _, _, nan, exp = quantize_blocks(b, scheme)
        scales = torch.where(nan, _E8M0_NAN, exp + 127).squeeze(-1).to(torch.uint8)
    _need("scales", scales, torch.uint8, 2)
    _need_shape("scales", scales, b.shape[:-1], "one scale per 32 elements")
    scaled = b * pow2(127 - scales.to(torch.int32).clamp(max=254)).unsqueeze(-1)  # exact
    scaled = scaled.masked_fill((scales == _E8M0_NAN).unsqueeze(-1), 0.0)  # a NaN block: codes 0
    return {"blocks": _pack_codes(fp4_codes(scaled)), "scales": scales}


def gptoss_mxfp4_to_packed(blocks: torch.Tensor, scales: torch.Tensor, scheme: Scheme = MXFP4) -> MXPacked:
    """gpt-oss MXFP4 -> :class:`MXPacked` [..., N, K]: the bytes as they are (``blocks`` flattened to
    [..., N, K/2]); bit-identical values."""
    _check_gptoss_mxfp4(blocks, scales)
    _check_mx_scheme(scheme)
    codes = blocks.flatten(-2)
    return MXPacked(codes, scales, torch.Size((*codes.shape[:-1], codes.shape[-1] * 2)), scheme, _MX_BLOCK)


# ----------------------------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class Layout:
    """One stored layout: its tensor names (decode's argument order), the :class:`Scheme` the stored weights
    correspond to, and its functions. ``exact_scale_order``: whether the library's dequantization is this
    project's float32 order for ``scheme`` (``value · multiplier`` with the same multiplier), so that
    ``unpack_mx(to_packed(...))`` equals ``decode(...)`` for any stored scales."""

    name: str
    library: str
    tensors: tuple[str, ...]
    scheme: Scheme
    decode: Callable[..., torch.Tensor]
    encode: Callable[..., dict[str, torch.Tensor]]
    to_packed: Callable[..., MXPacked]
    exact_scale_order: bool

    def decode_dict(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``decode`` of a module's tensors by name; ``ValueError`` naming any missing one."""
        return self.decode(*self._args(tensors))

    def to_packed_dict(self, tensors: Mapping[str, torch.Tensor], **kwargs: object) -> MXPacked:
        return self.to_packed(*self._args(tensors), **kwargs)

    def _args(self, tensors: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        missing = [n for n in self.tensors if n not in tensors]
        if missing:
            raise ValueError(f"{self.name}: missing tensor(s) {missing}; the layout stores {list(self.tensors)}, "
                             f"got {sorted(tensors)}")
        return [tensors[n] for n in self.tensors]


LAYOUTS: dict[str, Layout] = {
    lay.name: lay
    for lay in (
        Layout("ct-nvfp4", "compressed-tensors nvfp4-pack-quantized",
               ("weight_packed", "weight_scale", "weight_global_scale"), NVFP4,
               decode_ct_nvfp4, encode_ct_nvfp4, ct_nvfp4_to_packed, exact_scale_order=False),
        Layout("ct-mxfp4", "compressed-tensors mxfp4-pack-quantized", ("weight_packed", "weight_scale"),
               CT_MXFP4, decode_ct_mxfp4, encode_ct_mxfp4, ct_mxfp4_to_packed, exact_scale_order=True),
        Layout("modelopt-nvfp4", "NVIDIA ModelOpt NVFP4", ("weight", "weight_scale", "weight_scale_2"), NVFP4,
               decode_modelopt_nvfp4, encode_modelopt_nvfp4, modelopt_nvfp4_to_packed, exact_scale_order=True),
        Layout("gptoss-mxfp4", "gpt-oss MXFP4 (transformers)", ("blocks", "scales"), MXFP4,
               decode_gptoss_mxfp4, encode_gptoss_mxfp4, gptoss_mxfp4_to_packed, exact_scale_order=True),
    )
}


def get_layout(name: str) -> Layout:
    key = str(name).strip().lower().replace("_", "-")
    if key not in LAYOUTS:
        raise ValueError(f"unknown packed layout {name!r}; known: {', '.join(sorted(LAYOUTS))}")
    return LAYOUTS[key]

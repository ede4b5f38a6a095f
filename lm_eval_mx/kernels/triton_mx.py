"""Triton kernels: fake quantization along the last axis for every scheme, with the block Hadamard
rotation fused in (one pass: read once, write once; a per-tensor scale adds one read), and
kernels that decode packed weights (codes + E8M0 or E4M3 scales), alone or inside a GEMM.

The arithmetic is that of :mod:`lm_eval_mx.numerics.quantize` and :mod:`lm_eval_mx.numerics.rotation`
(exact power-of-two scaling, correctly rounded divisions ``div_rn``, the same butterfly
order), so results are bit-identical to the torch backend; the GPU tests check every
golden case and a property test over every scheme. Plain fp32 multiplies keep
subnormals in Triton (only libdevice calls flush), which the 2**-127 scale needs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..numerics.formats import E4M3, Rounding, ScaleMode, Scheme, TensorScale, is_power_of_two
from ..numerics.packing import MXPacked, codes_per_byte, unpack_mx
from ..numerics.rotation import Rotation, norm_scale, rotate, signs

_ROUNDING = {Rounding.EVEN: 0, Rounding.NEAREST: 1, Rounding.FLOOR: 2}
_SCALE_MODE = {ScaleMode.FLOOR: 0, ScaleMode.CEIL: 1, ScaleMode.EVEN: 2, ScaleMode.RCEIL: 3}


@triton.jit
def _pow2(e):
    """Exact float32 2**e for int32 e in [-127, 127]."""
    bits = tl.where(e > -127, (e + 127) << 23, 0x400000)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _round(v, emin, mbits, max_normal, ROUNDING: tl.constexpr):
    """float32 ``v`` rounded to a grid with ``mbits`` mantissa bits below each element's own exponent
    (floored at ``emin``: subnormals kept), then saturated to ±``max_normal``.

    Ties to even add and remove ``c = 1.5·2**(q + 23)``, ``q`` the exponent of the element's quantum:
    the float32 adder then rounds to a multiple of ``2**q`` exactly as ``round(v / 2**q) · 2**q`` does
    (``|v| < 2**(q + 22)``), in three operations; huge values, which saturate anyway, get a capped ``c``.
    """
    e = (v.to(tl.int32, bitcast=True) >> 23) & 0xFF
    if ROUNDING == 0:
        eb = tl.minimum(tl.maximum(e, emin + 127) - mbits + 23, 254)
        c = ((eb << 23) | 0x400000).to(tl.float32, bitcast=True)
        q = (v + c) - c
    else:
        p = tl.maximum(e - 127, emin) - mbits
        t = v * _pow2(-p)
        a = tl.abs(t)
        f = tl.floor(a)
        r = f + (a - f >= 0.5).to(tl.float32) if ROUNDING == 1 else f  # ties away, or toward zero
        r = tl.where(t < 0, -r, r)
        q = r * _pow2(p) + 0.0  # +0.0: no -0
    return tl.minimum(tl.maximum(q, -max_normal), max_normal)


@triton.jit
def _tensor_scale(amax_ptr, tensor_div):
    """(scale, reciprocal, non-finite?) of the per-tensor maximum at ``amax_ptr`` (int32 bits of |x|max):
    numerics.tensor_scale's arithmetic."""
    abits = tl.load(amax_ptr)
    ts = tl.math.div_rn(abits.to(tl.float32, bitcast=True), tensor_div)
    ts = tl.where(ts >= 1.1754943508222875e-38, ts, 1.0)
    return ts, tl.math.div_rn(1.0, ts), abits >= 0x7F800000


@triton.jit
def _quantize_blocks(x, amax_ptr, EMAX, EMIN, MBITS, MAX_NORMAL, INV_MAX_NORMAL, SCALE_EMAX, TENSOR_DIV,
                     ROUNDING: tl.constexpr, SCALE_MODE: tl.constexpr, E4M3: tl.constexpr, TENSOR: tl.constexpr):
    """Fake quantization of float32 blocks ``x`` [R, NB, BP] (padding lanes hold 0), NaN blocks as NaN:
    numerics.quantize_blocks followed by the multiply, operation for operation. The format parameters are
    constants in the flat kernel and runtime scalars in the general one (fewer compilations for odd shapes)."""
    abits = tl.max(x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=2)  # |x| max as bits; NaN sorts above inf
    amax = abits.to(tl.float32, bitcast=True)
    bad = abits >= 0x7F800000
    if E4M3:
        s = tl.math.div_rn(amax, MAX_NORMAL + tl.zeros_like(amax))
        if TENSOR:
            ts, inv_ts, tensor_bad = _tensor_scale(amax_ptr, TENSOR_DIV)
            s8 = _round(tl.math.div_rn(s, ts + tl.zeros_like(s)), -6, 3, 448.0, 0)
            recip = tl.math.div_rn(inv_ts + tl.zeros_like(s8), s8)
            mult = ts * s8
            bad = (abits >= 0) & tensor_bad  # every block (abits >= 0 always), when the tensor holds inf/NaN
        else:
            s8 = _round(s, -6, 3, 448.0, 0)
            recip = tl.math.div_rn(tl.full(s8.shape, 1.0, tl.float32), s8)
            mult = s8
        q = _round(x * recip[:, :, None], EMIN, MBITS, MAX_NORMAL, ROUNDING)
        out = tl.where((s8 == 0)[:, :, None], 0.0, q * mult[:, :, None])
    else:
        if SCALE_MODE == 3:  # rceil: ceil(log2(amax / max_normal)), as cuBLAS computes it
            dbits = (amax * INV_MAX_NORMAL).to(tl.int32, bitcast=True)
            dbiased = (dbits >> 23) & 0xFF
            dmant = dbits & 0x7FFFFF
            up = tl.where(dbiased == 0, dmant > 0x400000, dmant != 0)
            exp = dbiased + up.to(tl.int32) - 127
        else:
            bits = abits
            if SCALE_MODE == 2:  # even: round amax to the element's mantissa first
                bits = (bits + (1 << (22 - MBITS))) & 0x7F800000
            exp = ((bits >> 23) & 0xFF) - (127 + EMAX)
            if SCALE_MODE == 1:  # ceil
                exp += ((abits & 0x7FFFFF) != 0).to(tl.int32)
        bad = bad | (exp > SCALE_EMAX)
        exp = tl.minimum(tl.maximum(exp, -SCALE_EMAX), SCALE_EMAX)
        q = _round(x * _pow2(-exp)[:, :, None], EMIN, MBITS, MAX_NORMAL, ROUNDING)
        out = q * _pow2(exp)[:, :, None]
    return tl.where(bad[:, :, None], float("nan"), out)


@triton.jit
def _cast_out(out, ty, RNE_BF16: tl.constexpr):
    """The float32 result in the output dtype. E4M3-scaled values need rounding in bf16: done on the bits
    (round half to even), as torch's cast does, so the CPU interpreter (which truncates) and the GPU agree."""
    if RNE_BF16:
        b = out.to(tl.int32, bitcast=True)
        out = ((b + 0x7FFF + ((b >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    return out.to(ty)


@triton.jit
def _rotate(x, sign_ptr, col0, ROT_SCALE: tl.constexpr, ROWS: tl.constexpr, W: tl.constexpr, N: tl.constexpr,
            LOG_N: tl.constexpr, SIGNS: tl.constexpr):
    """Block Hadamard rotation of float32 ``x`` [ROWS, W] in blocks of N (rotation.rotate's arithmetic):
    signs, then butterflies (a + b, a - b) on pairs h = 1, 2, ..., N/2 apart, then the 1/sqrt(N) multiply."""
    if SIGNS:
        x = x * tl.load(sign_ptr + col0[:, None] + tl.arange(0, W)[None, :])
    for i in tl.static_range(LOG_N):
        y = tl.permute(tl.reshape(x, (ROWS * W // (2 << i), 2, 1 << i)), (0, 2, 1))
        a, b = tl.split(y)
        x = tl.reshape(tl.permute(tl.join(a + b, a - b), (0, 2, 1)), (ROWS, W))
    return x * ROT_SCALE


@triton.jit
def _tile_offsets(tile, ROWS: tl.constexpr, W: tl.constexpr):
    """Rows of the flat [n / W, W] view in tile ``tile``, and the output offsets of that [ROWS, W] tile."""
    r = tile.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    return r, r[:, None] * W + tl.arange(0, W)[None, :]


@triton.jit
def _load(ptr, offs, n_elems, EVEN: tl.constexpr):
    """float32 values at ``ptr + offs``; lanes past the end (whole tile rows) read as 0."""
    if EVEN:
        return tl.load(ptr + offs).to(tl.float32)
    else:
        return tl.load(ptr + offs, mask=offs < n_elems, other=0.0).to(tl.float32)


@triton.jit
def _load_tile(x_ptr, sign_ptr, r, offs, n_elems, n_cols, ROWS: tl.constexpr, W: tl.constexpr, ROT: tl.constexpr,
               LOG_ROT: tl.constexpr, ROT_SCALE: tl.constexpr, SIGNS: tl.constexpr, EVEN: tl.constexpr):
    """The program's [ROWS, W] tile of the flat input (rows of W consecutive elements) in float32, rotated when
    ROT > 0."""
    x = _load(x_ptr, offs, n_elems, EVEN)
    if ROT > 0:
        x = _rotate(x, sign_ptr, (r * W) % n_cols, ROT_SCALE, ROWS, W, ROT, LOG_ROT, SIGNS)
    return x


@triton.jit
def _mx_flat_kernel(
    x_ptr, y_ptr, sign_ptr, amax_ptr, n_elems, n_cols,
    EMAX: tl.constexpr, EMIN: tl.constexpr, MBITS: tl.constexpr, MAX_NORMAL: tl.constexpr,
    INV_MAX_NORMAL: tl.constexpr, SCALE_EMAX: tl.constexpr, TENSOR_DIV: tl.constexpr,
    ROUNDING: tl.constexpr, SCALE_MODE: tl.constexpr, E4M3: tl.constexpr, TENSOR: tl.constexpr,
    RNE_BF16: tl.constexpr, ROT: tl.constexpr, LOG_ROT: tl.constexpr, ROT_SCALE: tl.constexpr, SIGNS: tl.constexpr,
    ROWS: tl.constexpr, W: tl.constexpr, BS: tl.constexpr, EVEN: tl.constexpr,
):
    """Rotation (optional) and fake quantization of a tensor whose rows are whole blocks: each program reads
    a [ROWS, W] tile once and writes it once (W: blocks and rotation blocks fit in it)."""
    r, offs = _tile_offsets(tl.program_id(0), ROWS, W)
    x = _load_tile(x_ptr, sign_ptr, r, offs, n_elems, n_cols, ROWS, W, ROT, LOG_ROT, ROT_SCALE, SIGNS, EVEN)
    out = _quantize_blocks(tl.reshape(x, (ROWS, W // BS, BS)), amax_ptr, EMAX, EMIN, MBITS, MAX_NORMAL,
                           INV_MAX_NORMAL, SCALE_EMAX, TENSOR_DIV, ROUNDING, SCALE_MODE, E4M3, TENSOR)
    out = _cast_out(tl.reshape(out, (ROWS, W)), y_ptr.dtype.element_ty, RNE_BF16)
    if EVEN:
        tl.store(y_ptr + offs, out)
    else:
        tl.store(y_ptr + offs, out, mask=offs < n_elems)


@triton.jit
def _amax_flat_kernel(x_ptr, sign_ptr, amax_ptr, n_elems, n_cols, ROWS: tl.constexpr, W: tl.constexpr,
                      ROT: tl.constexpr, LOG_ROT: tl.constexpr, ROT_SCALE: tl.constexpr, SIGNS: tl.constexpr,
                      EVEN: tl.constexpr, TILES: tl.constexpr):
    """The per-tensor maximum of |x| (of what the quantizer sees: rotated), as int32 bits: each program
    takes TILES consecutive tiles and does one atomic max (one per tile would serialise on the one address)."""
    m = tl.zeros((), dtype=tl.int32)
    for i in tl.static_range(TILES):
        r, offs = _tile_offsets(tl.program_id(0) * TILES + i, ROWS, W)
        x = _load_tile(x_ptr, sign_ptr, r, offs, n_elems, n_cols, ROWS, W, ROT, LOG_ROT, ROT_SCALE, SIGNS, EVEN)
        m = tl.maximum(m, tl.max(tl.max(x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1), axis=0))
    tl.atomic_max(amax_ptr, m)


@triton.jit
def _mx_kernel(
    x_ptr, y_ptr, amax_ptr, n_rows, n_cols, block_size,
    EMAX, EMIN, MBITS, MAX_NORMAL, INV_MAX_NORMAL, SCALE_EMAX, TENSOR_DIV,
    ROUNDING: tl.constexpr, SCALE_MODE: tl.constexpr, E4M3: tl.constexpr, TENSOR: tl.constexpr,
    RNE_BF16: tl.constexpr, ROWS: tl.constexpr, NB: tl.constexpr, BP: tl.constexpr,
):
    """Fake quantization along the last axis for any block size and row length (ragged last blocks,
    blocks that are not a power of two), in [ROWS, NB, BP] tiles padded with zeros."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    blks = tl.program_id(1) * NB + tl.arange(0, NB)
    j = tl.arange(0, BP)
    cols = blks[None, :, None] * block_size + j[None, None, :]
    mask = (rows[:, None, None] < n_rows) & (j[None, None, :] < block_size) & (cols < n_cols)
    offs = rows[:, None, None].to(tl.int64) * n_cols + cols
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    out = _quantize_blocks(x, amax_ptr, EMAX, EMIN, MBITS, MAX_NORMAL, INV_MAX_NORMAL, SCALE_EMAX, TENSOR_DIV,
                           ROUNDING, SCALE_MODE, E4M3, TENSOR)
    tl.store(y_ptr + offs, _cast_out(out, y_ptr.dtype.element_ty, RNE_BF16), mask=mask)


# Elements per program and warps of the flat kernel (benchmarks/gpu_bench.py --tiles), and of the general one.
TILE_ELEMENTS, NUM_WARPS = 4096, 4
AMAX_TILES = 16  # tiles per program of the per-tensor maximum pass: one atomic per 16 tiles
GENERAL_TILE_ELEMENTS, GENERAL_WARPS = 1024, 2


@dataclass(frozen=True)
class _Plan:
    """Everything about a quantization call that does not change between calls of one layer: resolved once,
    so a decode step's many small calls pay only for the launch."""

    flat: bool
    width: int
    rows: int
    kwargs: dict  # the kernel's keyword arguments: constexprs (and the general kernel's format scalars)
    signs: Rotation | None  # the rotation whose signs the kernel reads
    options: dict  # launch options

    @property
    def tile(self) -> int:
        return self.rows * self.width

    @functools.cached_property
    def flat_kwargs(self) -> dict[bool, dict]:
        """The flat kernel's constexprs for a ragged (False) or whole (True) last tile: one dict object each."""
        return {even: {**self.kwargs, "EVEN": even} for even in (False, True)}

    @functools.cached_property
    def amax_kwargs(self) -> dict[bool, dict]:
        keep = ("ROWS", "W", "ROT", "LOG_ROT", "ROT_SCALE", "SIGNS")
        return {even: {**{k: self.kwargs[k] for k in keep}, "EVEN": even, "TILES": AMAX_TILES} for even in (False, True)}


# Contraction of a multiply into the next add (FMA) would skip the rounding that E4M3 scaling's
# x * (1 / scale) defines: the quantization kernels keep every float32 operation separate.
_OPTIONS = {"enable_fp_fusion": False}


@functools.lru_cache(maxsize=4096)
def _plan(scheme: Scheme, rotation: Rotation | None, n_cols: int, out: torch.dtype,
          tile_elements: int, num_warps: int) -> _Plan:
    fmt = scheme.elem
    block = n_cols if scheme.block_size == 0 else min(scheme.block_size, n_cols)
    rot = 0 if rotation is None else rotation.block_for(n_cols)
    width = max(block, rot)
    numerics = dict(
        EMAX=fmt.emax, EMIN=fmt.emin, MBITS=fmt.mbits, MAX_NORMAL=fmt.max_normal, INV_MAX_NORMAL=1.0 / fmt.max_normal,
        SCALE_EMAX=2 ** (scheme.scale_bits - 1) - 1, TENSOR_DIV=E4M3.max_normal * fmt.max_normal,
        ROUNDING=_ROUNDING[scheme.rounding], SCALE_MODE=_SCALE_MODE[scheme.scale_mode], E4M3=not scheme.is_mx,
        TENSOR=scheme.tensor_scale is TensorScale.AMAX, RNE_BF16=not scheme.is_mx and out == torch.bfloat16,
    )
    if is_power_of_two(block) and n_cols % width == 0 and width <= 4096:
        rows = max(1, tile_elements // width)
        seed = rotation is not None and rotation.seed is not None
        numerics.update(ROT=rot, LOG_ROT=max(rot, 1).bit_length() - 1, ROT_SCALE=norm_scale(rot) if rot else 1.0,
                        SIGNS=seed, ROWS=rows, W=width, BS=block)
        return _Plan(True, width, rows, numerics, rotation if seed else None, {**_OPTIONS, "num_warps": num_warps})
    rows, nb, bp = _tile(block, GENERAL_TILE_ELEMENTS)
    numerics.update(ROWS=rows, NB=nb, BP=bp)
    return _Plan(False, block, rows, numerics, None, {**_OPTIONS, "num_warps": GENERAL_WARPS})


def _tile(block: int, elements: int) -> tuple[int, int, int]:
    """(ROWS, NB, BP) of the general kernel: ``elements`` per program, up to 1024 columns a row."""
    bp = triton.next_power_of_2(block)
    nb = max(1, min(1024 // bp, 64))
    rows = max(1, elements // (nb * bp))
    return rows, nb, bp


def quantize_triton(
    x: torch.Tensor,
    scheme: Scheme,
    axis: int = -1,
    rotation: Rotation | None = None,
    tile_elements: int = TILE_ELEMENTS,
    num_warps: int = NUM_WARPS,
) -> torch.Tensor:
    """Same contract as :func:`lm_eval_mx.numerics.quantize.quantize_torch`, for CUDA tensors.

    Rows made of whole power-of-two blocks (nearly every activation) take the flat kernel, with the
    rotation fused in; other shapes take the general kernel, after a torch rotation (same arithmetic).
    A per-tensor scale costs one extra read of ``x`` (the maximum, by atomic max).
    """
    if x.numel() == 0:
        return x.clone()
    moved = axis not in (-1, x.dim() - 1)
    xc = (x.movedim(axis, -1) if moved else x).contiguous()
    n_cols = xc.shape[-1]
    plan = _plan(scheme, rotation, n_cols, x.dtype, tile_elements, num_warps)
    y = torch.empty_like(xc)
    if plan.flat:
        _launch_flat(plan, xc, y, n_cols)
    else:
        if rotation is not None:
            xc = rotate(xc, rotation)
        amax = xc.float().abs().amax().view(torch.int32) if plan.kwargs["TENSOR"] else y
        n = xc.numel()
        grid = (_cdiv(n // n_cols, plan.rows), _cdiv(_cdiv(n_cols, plan.width), plan.kwargs["NB"]))
        _mx_kernel[grid](xc, y, amax, n // n_cols, n_cols, plan.width, **plan.kwargs, **plan.options)
    return y.movedim(-1, axis) if moved else y


def _launch_flat(plan: _Plan, x: torch.Tensor, y: torch.Tensor, n_cols: int) -> None:
    n = y.numel()
    n_tiles = _cdiv(n, plan.tile)
    signs = _signs(plan.signs, n_cols, y.device) if plan.signs is not None else y
    if plan.kwargs["TENSOR"]:
        amax = torch.zeros((), dtype=torch.int32, device=y.device)
        whole = n % (plan.tile * AMAX_TILES) == 0  # no tile past the end: loads need no mask
        _amax_flat_kernel[(_cdiv(n_tiles, AMAX_TILES),)](x, signs, amax, n, n_cols, **plan.amax_kwargs[whole],
                                                         **plan.options)
    else:
        amax = y
    _mx_flat_kernel[(n_tiles,)](x, y, signs, amax, n, n_cols, **plan.flat_kwargs[n % plan.tile == 0], **plan.options)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # triton.cdiv is a jit function: slow to call from Python


def _signs(rotation: Rotation, n: int, device: torch.device) -> torch.Tensor:
    """The rotation's ±1 signs, cached on the device."""
    return signs(rotation.seed, n, device)  # type: ignore[arg-type]


@triton.jit
def _scale_factor(sc, ts, E4M3_SCALES: tl.constexpr):
    """What a block's codes are multiplied by (packing.scale_multipliers): 2**(s - 127) for E8M0 bytes
    (255: NaN), ``ts · e4m3(s)`` for E4M3 bytes (0x7F: NaN; the value from its fields, as for codes)."""
    if E4M3_SCALES:
        mag = sc & 0x7F
        s8 = (mag << 20).to(tl.float32, bitcast=True) * _pow2(120)
        return tl.where(mag == 0x7F, float("nan"), ts * s8)
    else:
        return tl.where(sc == 255, float("nan"), _pow2(sc - 127))  # NaN times any code is NaN


@triton.jit
def _decode(c_rows, s_rows, row_mask, k0, KP, NB, MBITS, EMIN, ts, BS: tl.constexpr, BITS: tl.constexpr,
            IS_INT: tl.constexpr, COLS: tl.constexpr, E4M3_SCALES: tl.constexpr):
    """float32 values of the packed weights in columns [k0, k0 + COLS) of the rows whose codes start at
    ``c_rows`` (scales at ``s_rows``): each element exactly from its code's bits, times its block's
    scale factor, the float32 product :func:`lm_eval_mx.numerics.packing.unpack_mx` computes.

    Codes are loaded as whole bytes and split in registers; each block's scale is loaded once when
    blocks tile ``COLS`` (otherwise per element), so the loads stay wide.
    """
    WIDTH: tl.constexpr = 8 if BITS > 4 else BITS
    PER: tl.constexpr = 8 // WIDTH
    ROWS: tl.constexpr = c_rows.shape[0]
    kb = k0 // PER + tl.arange(0, COLS // PER)
    byte = tl.load(c_rows + kb[None, :], mask=row_mask & (kb[None, :] < KP), other=0).to(tl.int32)
    if PER == 1:
        code = byte
    elif PER == 2:  # low nibble first
        code = tl.reshape(tl.join(byte & 15, byte >> 4), (ROWS, COLS))
    else:
        # join nests as [.., j, i] = (i ? join(c1, c3) : join(c0, c2))[j]: flattened c0, c1, c2, c3
        quads = tl.join(tl.join(byte & 3, (byte >> 4) & 3), tl.join((byte >> 2) & 3, byte >> 6))
        code = tl.reshape(quads, (ROWS, COLS))
    mag = code & ((1 << (BITS - 1)) - 1)
    if IS_INT:
        v = mag.to(tl.float32) * _pow2(-MBITS)
        v = tl.where((code >> (BITS - 1)) != 0, -v, v)
    else:
        # The code's exponent and mantissa fields placed in float32's (a subnormal when the exponent field
        # is 0) are the element's value times 2**-(126 + EMIN), for normal and subnormal codes alike.
        bits = (mag << (23 - MBITS)) | ((code >> (BITS - 1)) << 31)
        v = bits.to(tl.float32, bitcast=True) * _pow2(126 + EMIN)
    ONE: tl.constexpr = 0x38 if E4M3_SCALES else 127  # the scale 1.0, for lanes past the weight
    if COLS % BS == 0:
        sb = k0 // BS + tl.arange(0, COLS // BS)
        sc = tl.load(s_rows + sb[None, :], mask=row_mask & (sb[None, :] < NB), other=ONE).to(tl.int32)
        factor = _scale_factor(sc, ts, E4M3_SCALES)
        return tl.reshape(tl.reshape(v, (ROWS, COLS // BS, BS)) * factor[:, :, None], (ROWS, COLS))
    else:
        k = k0 + tl.arange(0, COLS)
        sc = tl.load(s_rows + k[None, :] // BS, mask=row_mask & (k[None, :] // BS < NB), other=ONE).to(tl.int32)
        return v * _scale_factor(sc, ts, E4M3_SCALES)


# Rows x columns of weight per program of the decode kernel, and its warps (packed_bench.py --dequant-tiles).
DEQUANT_TILE, DEQUANT_WARPS = (4, 1024), 4


@triton.jit
def _mx_dequant_kernel(c_ptr, s_ptr, ts_ptr, y_ptr, N, K, KP, NB, MBITS, EMIN, BS: tl.constexpr, BITS: tl.constexpr,
                       IS_INT: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, E4M3_SCALES: tl.constexpr,
                       HAS_TS: tl.constexpr):
    """y[N, K] = the packed weight decoded, in y's dtype (one pass: read codes and scales, write once).

    Programs walk the weight in memory order (column tiles fastest), so neighbouring programs
    write neighbouring memory.
    """
    col_tiles = tl.cdiv(K, COLS)
    rn = (tl.program_id(0) // col_tiles) * ROWS + tl.arange(0, ROWS)
    k0 = (tl.program_id(0) % col_tiles) * COLS
    k = k0 + tl.arange(0, COLS)
    rows = rn[:, None].to(tl.int64)
    ts = tl.load(ts_ptr) if HAS_TS else 1.0
    w = _decode(c_ptr + rows * KP, s_ptr + rows * NB, rn[:, None] < N, k0, KP, NB, MBITS, EMIN, ts, BS, BITS, IS_INT,
                COLS, E4M3_SCALES)
    tl.store(y_ptr + rows * K + k[None, :], w.to(y_ptr.dtype.element_ty), mask=(rn[:, None] < N) & (k[None, :] < K))


def mx_unpack_triton(
    p: MXPacked, dtype: torch.dtype = torch.float32, tile: tuple[int, int] = DEQUANT_TILE, num_warps: int = DEQUANT_WARPS
) -> torch.Tensor:
    """:func:`lm_eval_mx.numerics.packing.unpack_mx` of a 2-D packed weight on the GPU, bit for bit."""
    if not packed_gemm_supported(p) or len(p.shape) != 2:
        return unpack_mx(p, dtype)
    n, k = p.shape
    y = torch.empty((n, k), device=p.codes.device, dtype=dtype)
    rows, cols = tile
    fmt = p.fmt
    _mx_dequant_kernel[(_cdiv(n, rows) * _cdiv(k, cols),)](
        p.codes, p.scales, _ts_arg(p, y), y, n, k, p.codes.shape[-1], p.scales.shape[-1], fmt.mbits, fmt.emin,
        BS=p.block_size, BITS=fmt.bits, IS_INT=fmt.is_int, ROWS=rows, COLS=cols,
        E4M3_SCALES=not p.scheme.is_mx, HAS_TS=p.tensor_scale is not None, num_warps=num_warps,
    )
    return y


def _ts_arg(p: MXPacked, placeholder: torch.Tensor) -> torch.Tensor:
    """The per-tensor scale as a kernel argument (a placeholder pointer when there is none)."""
    return placeholder if p.tensor_scale is None else p.tensor_scale.reshape(1)


# Tile shapes (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps) tried per input-length class: thin tiles for
# decode-sized inputs, large ones for prefill. Few per class, since each is compiled per format width.
_TILES = {
    16: [(16, 128, 128, 4, 4), (32, 64, 128, 4, 4)],
    64: [(64, 128, 128, 4, 4), (64, 64, 64, 4, 4)],
    256: [(128, 128, 64, 4, 8), (128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 128, 128, 3, 8), (128, 256, 128, 3, 8)],
}


def _gemm_configs() -> list[triton.Config]:
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
        for tiles in _TILES.values() for bm, bn, bk, s, w in tiles
    ]


def _prune(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    """The tiles of the input's length class (``M_BUCKET``: M rounded up to a power of two, at most 256)."""
    m = named_args["M_BUCKET"]
    cls = next(c for c in _TILES if m <= c or c == 256)
    wanted = {(bm, bn, bk) for bm, bn, bk, _, _ in _TILES[cls]}
    return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]) in wanted]


@triton.autotune(configs=_gemm_configs(), key=["N", "K", "M_BUCKET", "BS"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _mx_packed_mm_kernel(
    x_ptr, c_ptr, s_ptr, ts_ptr, b_ptr, y_ptr, M, N, K, KP, NB, M_BUCKET, MBITS, EMIN,
    BS: tl.constexpr, BITS: tl.constexpr, IS_INT: tl.constexpr, E4M3_SCALES: tl.constexpr, HAS_TS: tl.constexpr,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y[M, N] = x[M, K] @ dequant(codes[N, KP], scales[N, NB]).T (+ bias), fp32 accumulation.

    Each weight tile is decoded in the main loop: codes -> element value (exact
    float32 from the code's bits) -> times its block's scale factor, the
    same float32 product :func:`lm_eval_mx.numerics.packing.unpack_mx` computes, then
    cast to the activation dtype for the tensor-core dot.
    """
    ts = tl.load(ts_ptr) if HAS_TS else 1.0
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n  # grouped order: neighbouring programs share weight tiles in L2
    first_m = (pid // group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    x_cols = x_ptr + rm[None, :].to(tl.int64) * K
    c_rows = c_ptr + rn[:, None].to(tl.int64) * KP
    s_rows = s_ptr + rn[:, None].to(tl.int64) * NB
    # Computed transposed, yᵀ = W · xᵀ: the decoded weight is the dot's first operand, which Hopper's
    # wgmma may take from registers; the second (x, straight from memory) goes through shared memory.
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        xt = tl.load(x_cols + k[:, None], mask=(k[:, None] < K) & (rm[None, :] < M), other=0.0)
        w = _decode(c_rows, s_rows, rn[:, None] < N, k0, KP, NB, MBITS, EMIN, ts, BS, BITS, IS_INT, BLOCK_K,
                    E4M3_SCALES)
        if IEEE:  # noqa: SIM108 (a compile-time branch)
            acc = tl.dot(w, xt, acc, input_precision="ieee")
        else:
            acc = tl.dot(w.to(xt.dtype), xt, acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[:, None]
    y = y_ptr + rm[None, :].to(tl.int64) * N + rn[:, None]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=(rm[None, :] < M) & (rn[:, None] < N))


def packed_gemm_supported(p: MXPacked) -> bool:
    """The kernel needs whole bytes per block (block size a multiple of the codes per byte)."""
    return p.block_size % codes_per_byte(p.fmt) == 0


def mx_packed_linear_triton(
    x: torch.Tensor, p: MXPacked, bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
    tile: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """``F.linear(x, unpack_mx(p, x.dtype), bias)`` with the weight decoded inside the GEMM.

    Equal to that reference up to the order of the float32 accumulation.
    ``out_dtype`` (default ``x.dtype``) lets tests read the float32 accumulator;
    ``tile`` (BLOCK_M, BLOCK_N, BLOCK_K) skips autotuning (one compilation).
    """
    n, k = p.shape
    if x.shape[-1] != k:
        raise ValueError(f"input has {x.shape[-1]} features, the packed weight expects {k}")
    if not packed_gemm_supported(p):
        out = torch.nn.functional.linear(x, unpack_mx(p, x.dtype), bias)
        return out if out_dtype is None else out.to(out_dtype)
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    y = torch.empty((m, n), device=x.device, dtype=out_dtype or x.dtype)
    if m == 0:
        return y.reshape(*x.shape[:-1], n)
    fmt = p.fmt
    grid = lambda meta: (_cdiv(m, meta["BLOCK_M"]) * _cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    kernel = _mx_packed_mm_kernel
    extra: dict = {}
    if tile is not None:
        kernel = _mx_packed_mm_kernel.fn
        extra = dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K"), tile), GROUP_M=8, num_warps=4)
    kernel[grid](
        x2, p.codes, p.scales, _ts_arg(p, y), bias if bias is not None else x2, y, m, n, k, p.codes.shape[-1],
        p.scales.shape[-1], min(triton.next_power_of_2(m), 256), fmt.mbits, fmt.emin,
        BS=p.block_size, BITS=fmt.bits, IS_INT=fmt.is_int, E4M3_SCALES=not p.scheme.is_mx,
        HAS_TS=p.tensor_scale is not None,
        HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32, **extra,
    )
    return y.reshape(*x.shape[:-1], n)

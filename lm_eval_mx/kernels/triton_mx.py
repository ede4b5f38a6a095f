"""Triton kernels: fake quantization along the last axis for every scheme, with the block Hadamard
rotation fused in (one pass: read once, write once; a per-tensor scale adds one read), launched
through :mod:`lm_eval_mx.kernels.launch` (the compiled kernel's own launcher after the first call).
The packed-weight kernels live in :mod:`lm_eval_mx.kernels.triton_packed` (re-exported here).

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
from ..numerics.quantize import quantize_torch
from ..numerics.rotation import Rotation, norm_scale, rotate, signs
from .launch import Launch, int_key, ptr_key
from .triton_packed import _cdiv, _pow2, mx_packed_linear_triton, mx_unpack_triton, packed_gemm_supported  # noqa: F401 (their old home)

_ROUNDING = {Rounding.EVEN: 0, Rounding.NEAREST: 1, Rounding.FLOOR: 2}
_SCALE_MODE = {ScaleMode.FLOOR: 0, ScaleMode.CEIL: 1, ScaleMode.EVEN: 2, ScaleMode.RCEIL: 3}


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
def _tensor_scale(abits, tensor_div):
    """(scale, reciprocal, non-finite?) of the per-tensor maximum ``abits`` (int32 bits of |x|max):
    numerics.tensor_scale's arithmetic."""
    ts = tl.math.div_rn(abits.to(tl.float32, bitcast=True), tensor_div)
    ts = tl.where(ts >= 1.1754943508222875e-38, ts, 1.0)
    return ts, tl.math.div_rn(1.0, ts), abits >= 0x7F800000


@triton.jit
def _quantize_blocks(x, tensor_bits, EMAX, EMIN, MBITS, MAX_NORMAL, INV_MAX_NORMAL, SCALE_EMAX, TENSOR_DIV,
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
            ts, inv_ts, tensor_bad = _tensor_scale(tensor_bits, TENSOR_DIV)
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
    ROWS: tl.constexpr, W: tl.constexpr, BS: tl.constexpr, EVEN: tl.constexpr, REVERSE: tl.constexpr,
    LOCAL_MAX: tl.constexpr,
):
    """Rotation (optional) and fake quantization of a tensor whose rows are whole blocks: each program reads
    a [ROWS, W] tile once and writes it once (W: blocks and rotation blocks fit in it). The per-tensor maximum
    (TENSOR) is read at ``amax_ptr`` (the maximum pass's result) or, LOCAL_MAX (small tensors), taken by every
    program over the whole tensor itself: one launch, no maximum pass. REVERSE: programs take the tiles last to
    first, so that after the maximum pass (first to last) the first reads may hit in L2."""
    pid = tl.program_id(0)
    if REVERSE:
        pid = tl.num_programs(0) - 1 - pid
    tensor_bits = 0
    if TENSOR:
        if LOCAL_MAX:
            tensor_bits = tl.zeros((), dtype=tl.int32)
            for t in range(0, tl.cdiv(n_elems, ROWS * W)):  # pid * 0 + t: a tensor (the interpreter's t is an int)
                tensor_bits = tl.maximum(tensor_bits, _tile_max(x_ptr, sign_ptr, pid * 0 + t, n_elems, n_cols, ROWS, W,
                                                                ROT, LOG_ROT, ROT_SCALE, SIGNS, EVEN))
        else:
            tensor_bits = tl.load(amax_ptr)
    r, offs = _tile_offsets(pid, ROWS, W)
    x = _load_tile(x_ptr, sign_ptr, r, offs, n_elems, n_cols, ROWS, W, ROT, LOG_ROT, ROT_SCALE, SIGNS, EVEN)
    out = _quantize_blocks(tl.reshape(x, (ROWS, W // BS, BS)), tensor_bits, EMAX, EMIN, MBITS, MAX_NORMAL,
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
        m = tl.maximum(m, _tile_max(x_ptr, sign_ptr, tl.program_id(0) * TILES + i, n_elems, n_cols, ROWS, W, ROT,
                                    LOG_ROT, ROT_SCALE, SIGNS, EVEN))
    tl.atomic_max(amax_ptr, m)


@triton.jit
def _tile_max(x_ptr, sign_ptr, tile, n_elems, n_cols, ROWS: tl.constexpr, W: tl.constexpr, ROT: tl.constexpr,
              LOG_ROT: tl.constexpr, ROT_SCALE: tl.constexpr, SIGNS: tl.constexpr, EVEN: tl.constexpr):
    """The maximum of |x| over tile ``tile`` (rotated when ROT > 0), as int32 bits (NaN sorts above inf)."""
    r, offs = _tile_offsets(tile, ROWS, W)
    x = _load_tile(x_ptr, sign_ptr, r, offs, n_elems, n_cols, ROWS, W, ROT, LOG_ROT, ROT_SCALE, SIGNS, EVEN)
    return tl.max(tl.max(x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1), axis=0)


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
    tensor_bits = 0
    if TENSOR:
        tensor_bits = tl.load(amax_ptr)
    out = _quantize_blocks(x, tensor_bits, EMAX, EMIN, MBITS, MAX_NORMAL, INV_MAX_NORMAL, SCALE_EMAX, TENSOR_DIV,
                           ROUNDING, SCALE_MODE, E4M3, TENSOR)
    tl.store(y_ptr + offs, _cast_out(out, y_ptr.dtype.element_ty, RNE_BF16), mask=mask)


# Elements per program and warps of the flat kernel (benchmarks/gpu_bench.py --only tiles), and of the general one.
TILE_ELEMENTS, NUM_WARPS = 4096, 4
# Inputs of at most SMALL_TILE[0] elements (decode sizes) without a per-tensor scale take tiles of SMALL_TILE[1]
# elements and SMALL_TILE[2] warps: more programs with less serial work each, for tensors too small to fill the GPU
# (gpu_bench.py --only decode; those with a per-tensor scale keep the large tile their in-kernel maximum loops over).
SMALL_TILE = (1 << 16, 1024, 4)
# The per-tensor maximum pass (gpu_bench.py --only amax): elements per tile, tiles per program (one atomic max
# each: one per tile would serialise on the one address), warps; and whether the quantization pass after it
# takes the tiles last to first (the tiles the maximum pass read last may still be in L2).
AMAX = (4096, 16, 4)
REVERSE_AFTER_AMAX = True
# Tensors of at most this many elements skip the maximum pass: each program of the quantization kernel takes the
# maximum over the whole (small, L2-resident) tensor itself. One launch instead of a memset and two: decode sizes.
LOCAL_MAX_ELEMENTS = 1 << 16
GENERAL_TILE_ELEMENTS, GENERAL_WARPS = 1024, 2


@dataclass(frozen=True)
class _Plan:
    """Everything about a quantization call that does not change between calls of one layer: resolved once,
    so a decode step's many small calls pay only for the launch."""

    flat: bool
    width: int
    rows: int
    n_cols: int
    kwargs: dict  # the kernel's keyword arguments: constexprs (and the general kernel's format scalars)
    signs: Rotation | None  # the rotation whose signs the kernel reads
    options: dict  # launch options
    amax: tuple[int, int, int] = (0, 0, 0)  # flat plans' maximum pass: rows per tile, tiles per program, warps
    reverse: bool = False  # the quantization pass takes the tiles last to first

    @property
    def tile(self) -> int:
        return self.rows * self.width

    @functools.cached_property
    def launches(self) -> dict[tuple[bool, bool], Launch]:
        """The flat kernel for a ragged (False) or whole (True) last tile, after the maximum pass (False) or
        taking the per-tensor maximum itself (True)."""
        return {(even, local): Launch(_mx_flat_kernel, {**self.kwargs, "EVEN": even, "LOCAL_MAX": local,
                                                        "REVERSE": self.reverse and not local, **self.options})
                for even in (False, True) for local in (False, True)}

    @functools.cached_property
    def amax_launches(self) -> dict[bool, Launch]:
        """The maximum pass, when no tile (False) or some (True) reaches past the end."""
        keep = {k: self.kwargs[k] for k in ("W", "ROT", "LOG_ROT", "ROT_SCALE", "SIGNS")}
        rows, tiles, warps = self.amax
        return {even: Launch(_amax_flat_kernel, {**keep, "ROWS": rows, "TILES": tiles, "EVEN": even, **_OPTIONS,
                                                 "num_warps": warps}) for even in (False, True)}


# Contraction of a multiply into the next add (FMA) would skip the rounding that E4M3 scaling's
# x * (1 / scale) defines: the quantization kernels keep every float32 operation separate.
_OPTIONS = {"enable_fp_fusion": False}


@functools.lru_cache(maxsize=4096)
def _plan(scheme: Scheme, rotation: Rotation | None, n_cols: int, out: torch.dtype,
          tile_elements: int = TILE_ELEMENTS, num_warps: int = NUM_WARPS, amax: tuple[int, int, int] = AMAX,
          reverse: bool = REVERSE_AFTER_AMAX) -> _Plan:
    fmt = scheme.elem
    block = n_cols if scheme.block_size == 0 else min(scheme.block_size, n_cols)
    rot = 0 if rotation is None else rotation.block_for(n_cols)
    width = max(block, rot)
    tensor = scheme.tensor_scale is TensorScale.AMAX
    numerics = dict(
        EMAX=fmt.emax, EMIN=fmt.emin, MBITS=fmt.mbits, MAX_NORMAL=fmt.max_normal, INV_MAX_NORMAL=1.0 / fmt.max_normal,
        SCALE_EMAX=2 ** (scheme.scale_bits - 1) - 1, TENSOR_DIV=E4M3.max_normal * fmt.max_normal,
        ROUNDING=_ROUNDING[scheme.rounding], SCALE_MODE=_SCALE_MODE[scheme.scale_mode], E4M3=not scheme.is_mx,
        TENSOR=tensor, RNE_BF16=not scheme.is_mx and out == torch.bfloat16,
    )
    if is_power_of_two(block) and n_cols % width == 0 and width <= 4096:
        rows = max(1, tile_elements // width)
        seed = rotation is not None and rotation.seed is not None
        numerics.update(ROT=rot, LOG_ROT=max(rot, 1).bit_length() - 1, ROT_SCALE=norm_scale(rot) if rot else 1.0,
                        SIGNS=seed, ROWS=rows, W=width, BS=block)
        amax_rows = max(1, amax[0] // width)
        return _Plan(True, width, rows, n_cols, numerics, rotation if seed else None,
                     {**_OPTIONS, "num_warps": num_warps}, (amax_rows, amax[1], amax[2]), tensor and reverse)
    rows, nb, bp = _tile(block, GENERAL_TILE_ELEMENTS)
    numerics.update(ROWS=rows, NB=nb, BP=bp)
    return _Plan(False, block, rows, n_cols, numerics, None, {**_OPTIONS, "num_warps": GENERAL_WARPS})


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
    tile_elements: int | None = None,
    num_warps: int | None = None,
    amax: tuple[int, int, int] = AMAX,
    reverse: bool = REVERSE_AFTER_AMAX,
) -> torch.Tensor:
    """Same contract as :func:`lm_eval_mx.numerics.quantize.quantize_torch`, for CUDA tensors.

    Rows made of whole power-of-two blocks (nearly every activation) take the flat kernel, with the
    rotation fused in; other shapes take the general kernel, after a torch rotation (same arithmetic).
    A per-tensor scale costs one extra read of ``x`` (the maximum, by atomic max). The keyword arguments
    after ``rotation`` choose tiles (benchmarks; None: by the input's size); every choice computes the same bits.
    """
    if x.numel() == 0:
        return x.clone()
    moved = axis not in (-1, x.dim() - 1)
    xc = (x.movedim(axis, -1) if moved else x).contiguous()
    tile = _tile_for(x.numel(), scheme)
    plan = _plan(scheme, rotation, xc.shape[-1], x.dtype, tile_elements or tile[0], num_warps or tile[1], amax, reverse)
    y = _quantize(plan, xc, rotation, not torch.compiler.is_compiling())
    return y.movedim(-1, axis) if moved else y


class ActQuantizer:
    """``quantize_triton(x, scheme, -1, rotation)`` for one layer's inputs (CPU tensors: the torch path), with the
    plan of each (row length, dtype, tile) kept here: a call looks it up by those, not by hashing the scheme."""

    def __init__(self, scheme: Scheme, rotation: Rotation | None) -> None:
        self.scheme, self.rotation = scheme, rotation
        self.plans: dict[tuple[int, torch.dtype, tuple[int, int]], _Plan] = {}

    def __reduce__(self) -> tuple:
        """Copies and pickles start with no plans: plans hold compiled kernels' launchers (device handles)."""
        return ActQuantizer, (self.scheme, self.rotation)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_cuda:
            return quantize_torch(x, self.scheme, -1, self.rotation)
        return self.triton(x)

    def triton(self, x: torch.Tensor) -> torch.Tensor:
        """The kernel's result for any tensor the kernel can read (CUDA; CPU under the interpreter)."""
        if torch.compiler.is_compiling() or x.numel() == 0:
            return quantize_triton(x, self.scheme, -1, self.rotation)
        key = (x.shape[-1], x.dtype, _tile_for(x.numel(), self.scheme))
        plan = self.plans.get(key)
        if plan is None:
            plan = self.plans[key] = _plan(self.scheme, self.rotation, key[0], key[1], *key[2])
        return _quantize(plan, x.contiguous(), self.rotation, True)


def _tile_for(n: int, scheme: Scheme) -> tuple[int, int]:
    """(elements per program, warps) of the flat kernel for an input of ``n`` elements (see SMALL_TILE)."""
    if n <= SMALL_TILE[0] and scheme.tensor_scale is not TensorScale.AMAX:
        return SMALL_TILE[1], SMALL_TILE[2]
    return TILE_ELEMENTS, NUM_WARPS


def _quantize(plan: _Plan, xc: torch.Tensor, rotation: Rotation | None, eager: bool) -> torch.Tensor:
    """The quantized contiguous non-empty ``xc`` (last axis), by ``plan``; ``eager``: not traced by torch.compile
    (the flat kernels may use their cached launchers)."""
    y = torch.empty_like(xc)
    if plan.flat:
        _launch_flat(plan, xc, y, eager)
        return y
    if rotation is not None:
        xc = rotate(xc, rotation)
    amax = xc.float().abs().amax().view(torch.int32) if plan.kwargs["TENSOR"] else y
    n, n_cols = xc.numel(), plan.n_cols
    grid = (_cdiv(n // n_cols, plan.rows), _cdiv(_cdiv(n_cols, plan.width), plan.kwargs["NB"]))
    _mx_kernel[grid](xc, y, amax, n // n_cols, n_cols, plan.width, **plan.kwargs, **plan.options)
    return y


def _launch_flat(plan: _Plan, x: torch.Tensor, y: torch.Tensor, eager: bool) -> None:
    """The flat kernel (after the maximum pass when the scheme has a per-tensor scale). The launches' class key:
    ``x``'s alignment and ``n``'s class; y, the signs and the maximum are fresh or cached allocations (aligned),
    ``n_cols`` is the plan's."""
    n = y.numel()
    signs = _signs(plan.signs, plan.n_cols, y.device) if plan.signs is not None else y
    key = (ptr_key(x), int_key(n)) if eager else None
    local = n <= LOCAL_MAX_ELEMENTS
    if plan.kwargs["TENSOR"] and not local:
        amax = torch.zeros((), dtype=torch.int32, device=y.device)
        rows, tiles, _ = plan.amax
        chunk = rows * plan.width * tiles
        _launch(plan.amax_launches[n % chunk == 0], _cdiv(n, chunk), (x, signs, amax, n, plan.n_cols), key)
    else:
        amax = y
    lau = plan.launches[n % plan.tile == 0, local and plan.kwargs["TENSOR"]]
    _launch(lau, _cdiv(n, plan.tile), (x, y, signs, amax, n, plan.n_cols), key)


def _launch(lau: Launch, grid: int, args: tuple, key: tuple | None) -> None:
    """Through the cached launcher, or (``key`` None: traced by torch.compile) through ``kernel[grid]``."""
    if key is None:
        lau.plain(grid, args)
    else:
        lau(grid, args, key)


def _signs(rotation: Rotation, n: int, device: torch.device) -> torch.Tensor:
    """The rotation's ±1 signs, cached on the device."""
    return signs(rotation.seed, n, device)  # type: ignore[arg-type]

"""Triton kernel for MX fake quantization along the last axis: one pass, read once, write once.

The arithmetic is that of :mod:`lm_eval_mx.numerics` (exact power-of-two scaling in
float32, bit-derived exponents), so results are bit-identical to the torch
backend; the GPU tests check every golden case. Plain fp32 multiplies keep
subnormals in Triton (only libdevice calls flush), which the 2**-127 scale needs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .formats import ElemFormat, Rounding, ScaleMode

_ROUNDING = {Rounding.EVEN: 0, Rounding.NEAREST: 1, Rounding.FLOOR: 2}
_SCALE_MODE = {ScaleMode.FLOOR: 0, ScaleMode.CEIL: 1, ScaleMode.EVEN: 2, ScaleMode.RCEIL: 3}


@triton.jit
def _pow2(e):
    """Exact float32 2**e for int32 e in [-127, 127]."""
    bits = tl.where(e > -127, (e + 127) << 23, 0x400000)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _mx_kernel(
    x_ptr, y_ptr, n_rows, n_cols, block_size,
    emax, emin, mbits, max_normal, inv_max_normal, scale_emax,
    ROUNDING: tl.constexpr, SCALE_MODE: tl.constexpr,
    ROWS: tl.constexpr, NB: tl.constexpr, BP: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    blks = tl.program_id(1) * NB + tl.arange(0, NB)
    j = tl.arange(0, BP)
    cols = blks[None, :, None] * block_size + j[None, None, :]
    mask = (rows[:, None, None] < n_rows) & (j[None, None, :] < block_size) & (cols < n_cols)
    offs = rows[:, None, None].to(tl.int64) * n_cols + cols
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)

    # shared exponent of each block
    amax = tl.max(tl.abs(x), axis=2)
    has_nan = tl.max((x != x).to(tl.int32), axis=2) > 0
    bits = amax.to(tl.int32, bitcast=True)
    if SCALE_MODE == 3:  # rceil: ceil(log2(amax / max_normal)), as cuBLAS computes it
        dbits = (amax * inv_max_normal).to(tl.int32, bitcast=True)
        dbiased = (dbits >> 23) & 0xFF
        dmant = dbits & 0x7FFFFF
        up = tl.where(dbiased == 0, dmant > 0x400000, dmant != 0)
        exp = dbiased + up.to(tl.int32) - 127
    else:
        if SCALE_MODE == 2:  # even: round amax to the element's mantissa first
            bits = (bits + (1 << (22 - mbits))) & 0x7F800000
        exp = ((bits >> 23) & 0xFF) - 127 - emax
        if SCALE_MODE == 1:  # ceil
            exp += ((amax.to(tl.int32, bitcast=True) & 0x7FFFFF) != 0).to(tl.int32)
    is_nan = has_nan | (((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) == 255) | (exp > scale_emax)
    exp = tl.minimum(tl.maximum(exp, -scale_emax), scale_emax)

    # element rounding with subnormals, saturating
    v = x * _pow2(-exp)[:, :, None]
    p = tl.maximum(((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, emin) - mbits
    t = v * _pow2(-p)
    if ROUNDING == 0:
        r = libdevice.rint(t)
    elif ROUNDING == 1:
        a = tl.abs(t)
        f = libdevice.floor(a)
        r = f + (a - f >= 0.5).to(tl.float32)
        r = tl.where(t < 0, -r, r)
    else:
        r = libdevice.trunc(t)
    q = r * _pow2(p)
    q = tl.minimum(tl.maximum(q, -max_normal), max_normal)
    out = q * _pow2(exp)[:, :, None]
    out = tl.where(is_nan[:, :, None], float("nan"), out) + 0.0
    tl.store(y_ptr + offs, out.to(y_ptr.dtype.element_ty), mask=mask)


# Elements per program and warps: tuned on an H100 (benchmarks/gpu_bench.py --tiles).
TILE_ELEMENTS, NUM_WARPS = 1024, 2


def _tile(block: int, elements: int) -> tuple[int, int, int]:
    """(ROWS, NB, BP): ``elements`` per program, up to 1024 columns a row."""
    bp = triton.next_power_of_2(block)
    nb = max(1, min(1024 // bp, 64))
    rows = max(1, elements // (nb * bp))
    return rows, nb, bp


def quantize_mx_triton(
    x: torch.Tensor,
    fmt: ElemFormat,
    block_size: int,
    axis: int,
    rounding: Rounding,
    scale_bits: int,
    scale_mode: ScaleMode,
    tile_elements: int = TILE_ELEMENTS,
    num_warps: int = NUM_WARPS,
) -> torch.Tensor:
    """Same contract as :func:`lm_eval_mx.numerics.quantize_mx_torch`, for CUDA tensors."""
    if x.numel() == 0:
        return x.clone()
    moved = axis not in (-1, x.dim() - 1)
    xc = (x.movedim(axis, -1) if moved else x).contiguous()
    n_cols = xc.shape[-1]
    n_rows = xc.numel() // n_cols
    block = n_cols if block_size == 0 else min(block_size, n_cols)
    y = torch.empty_like(xc)
    rows, nb, bp = _tile(block, tile_elements)
    n_blocks = triton.cdiv(n_cols, block)
    grid = (triton.cdiv(n_rows, rows), triton.cdiv(n_blocks, nb))
    _mx_kernel[grid](
        xc, y, n_rows, n_cols, block,
        fmt.emax, fmt.emin, fmt.mbits, fmt.max_normal, 1.0 / fmt.max_normal, 2 ** (scale_bits - 1) - 1,
        ROUNDING=_ROUNDING[rounding], SCALE_MODE=_SCALE_MODE[scale_mode],
        ROWS=rows, NB=nb, BP=bp, num_warps=num_warps,
    )
    return y.movedim(-1, axis) if moved else y

"""Triton kernels: MX fake quantization along the last axis (one pass, read once, write once)
and a GEMM whose weights are packed MX codes + E8M0 scales, decoded in its main loop.

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
from .packing import MXPacked, codes_per_byte, unpack_mx

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


@triton.jit
def _decode(c_rows, s_rows, row_mask, k0, KP, NB, MBITS, EMIN, BS: tl.constexpr, BITS: tl.constexpr,
            IS_INT: tl.constexpr, COLS: tl.constexpr):
    """float32 values of the packed weights in columns [k0, k0 + COLS) of the rows whose codes start at
    ``c_rows`` (scales at ``s_rows``): each element exactly from its code's bits, times its block's
    2**(scale - 127), the float32 product :func:`lm_eval_mx.packing.unpack_mx` computes.

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
    if COLS % BS == 0:
        sb = k0 // BS + tl.arange(0, COLS // BS)
        sc = tl.load(s_rows + sb[None, :], mask=row_mask & (sb[None, :] < NB), other=127).to(tl.int32)
        factor = tl.where(sc == 255, float("nan"), _pow2(sc - 127))  # NaN times any code is NaN
        return tl.reshape(tl.reshape(v, (ROWS, COLS // BS, BS)) * factor[:, :, None], (ROWS, COLS))
    else:
        k = k0 + tl.arange(0, COLS)
        sc = tl.load(s_rows + k[None, :] // BS, mask=row_mask & (k[None, :] // BS < NB), other=127).to(tl.int32)
        return v * tl.where(sc == 255, float("nan"), _pow2(sc - 127))


# Rows x columns of weight per program of the decode kernel, and its warps (packed_bench.py --dequant-tiles).
DEQUANT_TILE, DEQUANT_WARPS = (4, 1024), 4


@triton.jit
def _mx_dequant_kernel(c_ptr, s_ptr, y_ptr, N, K, KP, NB, MBITS, EMIN, BS: tl.constexpr, BITS: tl.constexpr,
                       IS_INT: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """y[N, K] = the packed weight decoded, in y's dtype (one pass: read codes and scales, write once).

    Programs walk the weight in memory order (column tiles fastest), so neighbouring programs
    write neighbouring memory.
    """
    col_tiles = tl.cdiv(K, COLS)
    rn = (tl.program_id(0) // col_tiles) * ROWS + tl.arange(0, ROWS)
    k0 = (tl.program_id(0) % col_tiles) * COLS
    k = k0 + tl.arange(0, COLS)
    rows = rn[:, None].to(tl.int64)
    w = _decode(c_ptr + rows * KP, s_ptr + rows * NB, rn[:, None] < N, k0, KP, NB, MBITS, EMIN, BS, BITS, IS_INT, COLS)
    tl.store(y_ptr + rows * K + k[None, :], w.to(y_ptr.dtype.element_ty), mask=(rn[:, None] < N) & (k[None, :] < K))


def mx_unpack_triton(
    p: MXPacked, dtype: torch.dtype = torch.float32, tile: tuple[int, int] = DEQUANT_TILE, num_warps: int = DEQUANT_WARPS
) -> torch.Tensor:
    """:func:`lm_eval_mx.packing.unpack_mx` of a 2-D packed weight on the GPU, bit for bit."""
    if not packed_gemm_supported(p) or len(p.shape) != 2:
        return unpack_mx(p, dtype)
    n, k = p.shape
    y = torch.empty((n, k), device=p.codes.device, dtype=dtype)
    rows, cols = tile
    fmt = p.fmt
    _mx_dequant_kernel[(triton.cdiv(n, rows) * triton.cdiv(k, cols),)](
        p.codes, p.scales, y, n, k, p.codes.shape[-1], p.scales.shape[-1], fmt.mbits, fmt.emin,
        BS=p.block_size, BITS=fmt.bits, IS_INT=fmt.is_int, ROWS=rows, COLS=cols, num_warps=num_warps,
    )
    return y


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
    x_ptr, c_ptr, s_ptr, b_ptr, y_ptr, M, N, K, KP, NB, M_BUCKET, MBITS, EMIN,
    BS: tl.constexpr, BITS: tl.constexpr, IS_INT: tl.constexpr,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y[M, N] = x[M, K] @ dequant(codes[N, KP], scales[N, NB]).T (+ bias), fp32 accumulation.

    Each weight tile is decoded in the main loop: codes -> element value (exact
    float32 from the code's bits) -> times its block's 2**(scale - 127), the
    same float32 product :func:`lm_eval_mx.packing.unpack_mx` computes, then
    cast to the activation dtype for the tensor-core dot.
    """
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
        w = _decode(c_rows, s_rows, rn[:, None] < N, k0, KP, NB, MBITS, EMIN, BS, BITS, IS_INT, BLOCK_K)
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
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    kernel = _mx_packed_mm_kernel
    extra: dict = {}
    if tile is not None:
        kernel = _mx_packed_mm_kernel.fn
        extra = dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K"), tile), GROUP_M=8, num_warps=4)
    kernel[grid](
        x2, p.codes, p.scales, bias if bias is not None else x2, y, m, n, k, p.codes.shape[-1], p.scales.shape[-1],
        min(triton.next_power_of_2(m), 256), fmt.mbits, fmt.emin,
        BS=p.block_size, BITS=fmt.bits, IS_INT=fmt.is_int,
        HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32, **extra,
    )
    return y.reshape(*x.shape[:-1], n)

"""Triton kernels that decode packed weights (codes + E8M0 or E4M3 scales), alone or inside a GEMM, bit for bit
as :func:`lm_eval_mx.numerics.packing.unpack_mx` (``lm_eval_mx.kernels.triton_mx`` re-exports them), and the
helpers the quantizer kernels share with them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..numerics.packing import MXPacked, codes_per_byte, unpack_mx


@triton.jit
def _pow2(e):
    """Exact float32 2**e for int32 e in [-127, 127]."""
    bits = tl.where(e > -127, (e + 127) << 23, 0x400000)
    return bits.to(tl.float32, bitcast=True)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # triton.cdiv is a jit function: slow to call from Python


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

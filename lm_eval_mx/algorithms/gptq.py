"""GPTQ / MR-GPTQ weight rounding on the project's exact quantizer.

GPTQ (Frantar et al., 2022, https://arxiv.org/abs/2210.17323) rounds a weight ``W`` [out, in] one input
column at a time and pushes each column's rounding error onto the columns not yet rounded, weighted by
the inverse Hessian of the layer's inputs, so that ``‖X Wᵀ - X Ŵᵀ‖`` stays small on calibration inputs
``X``. MR-GPTQ (Egiazarian et al., 2025, https://arxiv.org/abs/2509.23202; IST-DASLab/FP-Quant) is GPTQ
run in a block-Hadamard-rotated domain, with the MX/NVFP4 block scales chosen once, up front, from the
rotated weight ("static" scales).

Every column is rounded by :func:`lm_eval_mx.numerics.quantize.round_on_scales` on scales from
:func:`lm_eval_mx.numerics.quantize.block_scales`, the very arithmetic of ``quantize_torch``; so the result lies
on the scheme's grid bit for bit, and with a diagonal Hessian (no column couples to another) GPTQ
returns exactly what ``quantize_torch(w, scheme, rotation=rotation)`` returns.

The algorithm, for one weight ``W`` [out, in] (blocks of ``scheme.block_size`` along ``in``):

1. Hessian. ``H = 2/n · Σ xᵀx`` over the ``n`` calibration tokens ``x`` [in] that reach the layer,
   accumulated in float32 (:class:`HessianAccumulator`). With a rotation ``R`` (block Hadamard, see
   :mod:`lm_eval_mx.numerics.rotation`) the inputs are rotated first (``x R``), so ``H`` is the Hessian of the
   rotated inputs, and ``W`` is rotated too (``W R``, float32, as ``quantize_torch`` does).
2. Scales (``scales="static"``, FP-Quant / llm-compressor): every block scale, and NVFP4's per-tensor
   scale, is computed from the original rotated weight, before any update, exactly as RTN computes
   them. (``scales="lazy"``, torchao: the per-tensor scale as above; a block's scale is computed when
   step 6 reaches the block's first column, from the block's columns as updated by then.)
3. Dead inputs: where ``H[i, i] == 0`` set ``H[i, i] = 1`` and ``W[:, i] = 0``.
4. Damping: ``λ = damp · mean(diag H)`` is added to the diagonal.
5. Inverse factor, in float64: ``L = cholesky(H + λI)``, ``H⁻¹ = cholesky_inverse(L)``,
   ``U = cholesky(H⁻¹, upper=True)`` (``H⁻¹ = UᵀU``). If a factorisation fails (or gives non-finite
   values), the relative damping is raised to ``max(10 · damp, 1e-6)`` and step 4 is retried, up to
   ``MAX_RETRIES`` times (recorded in the result); then :class:`GPTQError` names the layer shape and
   the damping tried.
6. Columns, in order (``act_order``: in decreasing ``diag H`` order, ``W``'s columns and ``H`` permuted
   alike; every column still uses the scale of its own block of the original layout, so the MX block
   structure along ``in`` is kept: this is why act_order takes only static scales). The working copy of
   ``W`` is float64. For column blocks ``[b, e)`` of ``block_columns`` columns ("lazy batch"), for each
   column ``i`` in it:

   * ``q_i = dequant(round(fp32(w_i) · recip) )`` on its block's scale: element values
     ``round_elements(fp32(w_i) · recip)`` times the block's multiplier, NaN for NaN blocks, +0 for
     zeros (:func:`lm_eval_mx.numerics.quantize.round_on_scales`, :func:`~lm_eval_mx.numerics.quantize.dequantize_elements`);
   * ``err_i = (w_i - q_i) / U[i, i]`` (float64; 0 in NaN blocks, which have no finite error);
   * ``w_j -= err_i · U[i, j]`` for the later columns ``j`` of the batch ``(i, e)``;

   then the batch's errors reach the columns after it at once: ``W[:, e:] -= Err · U[b:e, e:]``.
   (A lazy scale whose block runs past ``e`` is computed from those columns with the batch's pending
   updates applied, so the result does not depend on ``block_columns`` beyond float64 rounding.)
7. The result: ``Q`` (float32, the permutation undone), in the rotated domain when rotating, and the
   Hessian-weighted errors ``tr((W - Q) H (W - Q)ᵀ)`` of GPTQ and of RTN (``H`` as given, undamped).

Precision: the Hessian is accumulated in float32; its inverse factor, the working weight, the errors
and their propagation are float64 (a column is cast to float32 to be rounded). With float64 updates,
the order in which errors are summed (the lazy batches) leaves the float32 values GPTQ rounds unchanged
but for float64 rounding that practically never crosses a float32 rounding boundary. Everything runs
on the weight's device; on CPU two runs give identical bits. float64 stays where it is because the codes are
defined by it: a float32 working weight would round some columns differently (and float64 on an H100/H200
is not what bounds the run: the column loop is launch-bound, the batch update is one GEMM per batch).

Speed on CUDA: step 6 is a sequence of small kernels per column (rows are independent, columns are not), so
Python's launch overhead bounds it. With static scales, every full batch of ``block_columns`` columns replays
one CUDA graph captured from the very same per-column code on static buffers (:class:`_BatchGraph`): the same
kernels on the same shapes, hence the same bits as the eager loop, which still runs on CPU, for lazy scales and
for a ragged last batch. No step syncs with the host per column.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..numerics.formats import Scheme, TensorScale
from ..numerics.packing import MXPacked, pack_elements
from ..numerics.quantize import block_scales, dequantize_elements, quantize_torch, round_on_scales, tensor_scale
from ..numerics.rotation import Rotation, fwht, norm_scale, rotate, signs

MAX_RETRIES = 5  # Cholesky retries, each with ten times the relative damping
MIN_RETRY_DAMP = 1e-6  # the relative damping of a retry when the first was 0
SCALES = ("static", "lazy")


class GPTQError(RuntimeError):
    """GPTQ could not factor the damped Hessian."""


@dataclass(frozen=True)
class GPTQOptions:
    """GPTQ settings (see the module docstring for the algorithm).

    ``block_columns``: columns per lazy batch update; ``damp``: relative damping, ``λ = damp · mean(diag H)``;
    ``act_order``: process columns in decreasing ``diag H`` (static scales only); ``scales``: ``static``
    (block scales from the original weight) or ``lazy`` (a block's scale from the updated weight when its
    first column is reached); ``expert_min_tokens``: an expert of a fused MoE layer routed fewer calibration
    tokens is rounded to nearest (None: fewer tokens than the weight has inputs; see :mod:`.gptq_moe`).
    """

    block_columns: int = 128
    damp: float = 0.01
    act_order: bool = False
    scales: str = "static"
    expert_min_tokens: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.block_columns, bool) or not isinstance(self.block_columns, int) or self.block_columns < 1:
            raise ValueError(f"GPTQ block_columns must be an integer >= 1, got {self.block_columns!r}")
        if (isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not math.isfinite(self.damp)
                or self.damp < 0):
            raise ValueError(f"GPTQ damp must be a finite number >= 0 (relative to mean(diag H)), got {self.damp!r}")
        if not isinstance(self.act_order, bool):
            raise ValueError(f"GPTQ act_order must be True or False, got {self.act_order!r}")
        if self.expert_min_tokens is not None and (isinstance(self.expert_min_tokens, bool) or not isinstance(
                self.expert_min_tokens, int) or self.expert_min_tokens < 1):
            raise ValueError(f"GPTQ expert_min_tokens must be an integer >= 1, got {self.expert_min_tokens!r}")
        if self.scales not in SCALES:
            raise ValueError(f"GPTQ scales must be one of {', '.join(SCALES)}, got {self.scales!r}")
        if self.act_order and self.scales != "static":
            raise ValueError(f"GPTQ act_order needs scales='static' (got scales={self.scales!r}): with columns out of "
                             "order a block's scale cannot wait for its first column")


@dataclass
class GPTQResult:
    """What :func:`gptq_weight` returns.

    ``weight``: float32 [out, in], fake-quantized, in the rotated domain when a rotation was given;
    ``damping``: the λ added to the diagonal (absolute) and ``relative_damping`` its ratio to mean(diag H);
    ``cholesky_retries``: how many times the damping was raised; ``dead_columns``: inputs with ``H[i, i] == 0``;
    ``hessian_error`` / ``rtn_hessian_error``: ``tr((W - Q) H (W - Q)ᵀ)`` of GPTQ's and RTN's ``Q``
    (``W`` rotated when rotating, ``H`` as given); ``perm``: the column order used (act_order), else None;
    ``packed``: the same weight as codes on the scales GPTQ rounded on (:func:`pack_elements`), what a checkpoint
    stores (``unpack_mx(packed)`` equals ``weight`` bit for bit); ``tokens``: the calibration tokens its Hessian
    was taken from (set by :func:`gptq_layers`); ``fallback``: why the weight was rounded to nearest instead
    (too few tokens, :func:`rtn_fallback`), else None.
    """

    weight: torch.Tensor
    damping: float
    relative_damping: float
    cholesky_retries: int
    dead_columns: int
    hessian_error: float
    rtn_hessian_error: float
    perm: torch.Tensor | None = None
    packed: MXPacked | None = None
    tokens: int = 0
    fallback: str | None = None

    @property
    def cholesky_retry(self) -> bool:
        return self.cholesky_retries > 0


def block_length(n: int, scheme: Scheme) -> int:
    """Columns per scale block on a row of ``n`` (as ``quantize_torch``: the row for ``block_size=0``); a
    ragged last block holds ``n % block`` columns."""
    return n if scheme.block_size == 0 else min(scheme.block_size, n)


def _scales(w32: torch.Tensor, bs: int, scheme: Scheme, tensor_amax: torch.Tensor | None) -> list[torch.Tensor]:
    """(recip, mult, nan, stored), each [out, blocks], of float32 ``w32`` [out, k] in blocks of ``bs``."""
    out, n = w32.shape
    full = n - n % bs
    parts = []
    if full:
        parts.append(w32[:, :full].reshape(out, -1, bs).abs().amax(-1, keepdim=True))
    if full < n:
        parts.append(w32[:, full:].abs().amax(-1, keepdim=True).unsqueeze(1))
    amax = torch.cat(parts, dim=1)
    return [t.squeeze(-1).clone(memory_format=torch.contiguous_format)  # writable (lazy scales), not expanded
            for t in block_scales(amax, scheme, tensor_amax)]


def inverse_hessian_factor(hessian: torch.Tensor, damp: float, shape: tuple[int, ...] = ()
                           ) -> tuple[torch.Tensor, float, float, int]:
    """Steps 4-5 on a float64 Hessian whose dead inputs are already set to 1: (``U``, upper Cholesky factor
    of ``(H + λI)⁻¹``, float64; λ; the relative damping; retries). ``shape``: the layer's, for the error."""
    diag = torch.diagonal(hessian)
    mean = float(diag.mean())
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    rel, tried = float(damp), []
    for retry in range(MAX_RETRIES + 1):
        lam = rel * mean
        tried.append(f"{rel:g} (λ={lam:.6g})")
        chol, info = torch.linalg.cholesky_ex(hessian + lam * eye)
        if int(info) == 0 and bool(torch.isfinite(chol).all()):
            u, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if int(info) == 0 and bool(torch.isfinite(u).all()):
                return u, lam, rel, retry
        rel = max(10 * rel, MIN_RETRY_DAMP)
    raise GPTQError(f"GPTQ: the damped Hessian of the layer of shape {tuple(shape)} is not positive definite "
                    f"after {MAX_RETRIES} retries; relative damping tried: {', '.join(tried)}; mean(diag H) = "
                    f"{mean:.6g}. More (or more varied) calibration tokens or a larger damp may help.")


def _hessian_error(delta: torch.Tensor, h: torch.Tensor) -> float:
    return float(((delta @ h) * delta).sum())


@dataclass
class _Columns:
    """Step 6's state for one weight: the float64 working weight ``work`` [out, n] (columns permuted under
    act_order), the inverse factor ``u``, the per-block scales (recip, mult, nan, stored) [out, blocks], each
    column's block ``col_block`` and the outputs ``q_out`` / ``elements`` [out, n] (float32)."""

    work: torch.Tensor
    u: torch.Tensor
    scales: list[torch.Tensor]
    col_block: list[int]
    bs: int
    scheme: Scheme
    tensor_amax: torch.Tensor | None
    lazy: bool
    q_out: torch.Tensor
    elements: torch.Tensor

    def column(self, w1: torch.Tensor, u1: torch.Tensor, err1: torch.Tensor, k: int, cols: list[torch.Tensor],
               q_cols: torch.Tensor, e_cols: torch.Tensor) -> None:
        """Round column ``k`` of the batch ``w1`` [out, width] on its block's scales ``cols`` (recip, mult, nan,
        stored; each [out]), store it in ``q_cols`` / ``e_cols`` and its error in ``err1``, and push the error
        onto the batch's later columns."""
        recip, mult, nan, stored = cols
        wc = w1[:, k]
        e = round_on_scales(wc.to(torch.float32), recip, stored, self.scheme)
        q = dequantize_elements(e, mult, nan)
        e_cols[:, k] = e
        q_cols[:, k] = q
        err = (wc - q.to(torch.float64)) / u1[k, k]
        err = torch.where(nan, torch.zeros_like(err), err)
        w1[:, k + 1:] -= torch.outer(err, u1[k, k + 1:])
        err1[:, k] = err

    def lazy_scales(self, w1: torch.Tensor, err1: torch.Tensor, b1: int, b2: int, k: int) -> None:
        """``scales="lazy"``: the scales of the block starting at column ``b1 + k``, from its columns as updated
        by now (those past the batch with the batch's pending updates applied)."""
        c, n = b1 + k, self.work.shape[1]
        blk = self.col_block[c]
        end = min(c + self.bs, n)
        cols = w1[:, k:min(end, b2) - b1]
        if end > b2:
            cols = torch.cat([cols, self.work[:, b2:end] - err1[:, :k] @ self.u[b1:c, b2:end]], dim=1)
        s = _scales(cols.to(torch.float32), end - c, self.scheme, self.tensor_amax)
        for dst, src in zip(self.scales, s):
            dst[:, blk] = src[:, 0]

    def batch_eager(self, b1: int, b2: int) -> torch.Tensor:
        """Columns ``[b1, b2)`` one after another, in place; returns the batch's errors ``Err`` [out, b2 - b1]."""
        w1 = self.work[:, b1:b2].clone()
        err1 = torch.zeros_like(w1)
        u1 = self.u[b1:b2, b1:b2]
        for k in range(b2 - b1):
            c = b1 + k
            blk = self.col_block[c]
            if self.lazy and c == blk * self.bs:
                self.lazy_scales(w1, err1, b1, b2, k)
            self.column(w1, u1, err1, k, [t[:, blk] for t in self.scales], self.q_out[:, b1:b2],
                        self.elements[:, b1:b2])
        return err1

    def run(self, block_columns: int) -> None:
        """Step 6 over all columns: lazy batches of ``block_columns``, each batch's errors pushed onto the columns
        after it at once. On CUDA, full batches with static scales replay one captured CUDA graph of the batch
        (the same kernels on the same shapes as :meth:`batch_eager`: the same bits, without the per-column
        launch overhead of Python)."""
        n = self.work.shape[1]
        graph = _BatchGraph(self, block_columns) if _graphs_apply(self, block_columns) else None
        for b1 in range(0, n, block_columns):
            b2 = min(b1 + block_columns, n)
            full = graph is not None and b2 - b1 == block_columns
            err1 = graph.replay(b1) if full else self.batch_eager(b1, b2)  # type: ignore[union-attr]
            if b2 < n:
                self.work[:, b2:] -= err1 @ self.u[b1:b2, b2:]


def _graphs_apply(state: _Columns, block_columns: int) -> bool:
    return (state.work.is_cuda and not state.lazy and state.work.shape[1] >= 2 * block_columns
            and torch.cuda.is_available() and _USE_GRAPHS)


_USE_GRAPHS = True  # CUDA graphs for full static batches (tests turn it off to compare with the eager path)


class _BatchGraph:
    """One full batch of step 6 captured as a CUDA graph on static buffers: the batch's working columns, its
    block of ``U`` and every column's scales gathered per column; replayed for each full batch."""

    def __init__(self, state: _Columns, width: int) -> None:
        self.state, self.width = state, width
        out = state.work.shape[0]
        self.w1 = torch.empty(out, width, dtype=torch.float64, device=state.work.device)
        self.u1 = torch.empty(width, width, dtype=torch.float64, device=state.work.device)
        self.cols = [torch.empty(out, width, dtype=t.dtype, device=t.device) for t in state.scales]
        self.err1 = torch.zeros_like(self.w1)
        self.q = torch.empty(out, width, dtype=torch.float32, device=state.work.device)
        self.e = torch.empty_like(self.q)
        self.graph: Any = None

    def _body(self) -> None:
        self.err1.zero_()
        for k in range(self.width):
            self.state.column(self.w1, self.u1, self.err1, k, [t[:, k] for t in self.cols], self.q, self.e)

    def replay(self, b1: int) -> torch.Tensor:
        s, b2 = self.state, b1 + self.width
        self.w1.copy_(s.work[:, b1:b2])
        self.u1.copy_(s.u[b1:b2, b1:b2])
        index = torch.tensor(s.col_block[b1:b2], device=s.work.device)
        for dst, src in zip(self.cols, s.scales):
            torch.index_select(src, 1, index, out=dst)
        if self.graph is None:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up outside the capture, as torch.cuda.graphs asks
                w1 = self.w1.clone()
                self._body()
                self.w1.copy_(w1)
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._body()
        self.graph.replay()
        s.q_out[:, b1:b2] = self.q
        s.elements[:, b1:b2] = self.e
        return self.err1


def _prepare(w: torch.Tensor, hessian: torch.Tensor, scheme: Scheme, rotation: Rotation | None,
             options: GPTQOptions) -> tuple[_Columns, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None,
                                            tuple[float, float, int]]:
    """Steps 1-5: (the step-6 state, ``W`` rotated (float32), ``H`` as given (float64), the dead inputs, the
    permutation, (λ, relative damping, retries))."""
    out, n = w.shape
    device = w.device
    w = w.detach()
    w32 = rotate(w, rotation) if rotation is not None else w.to(torch.float32)
    h_given = hessian.to(device=device, dtype=torch.float64)
    bs = block_length(n, scheme)
    tensor_amax = w32.abs().amax() if scheme.tensor_scale is TensorScale.AMAX else None
    # Step 2: static scales, from the original (rotated) weight; lazy ones are filled in step 6.
    scales = _scales(w32, bs, scheme, tensor_amax)
    # Step 3: dead inputs.
    h = h_given.clone()
    work = w32.to(torch.float64)
    diag = torch.diagonal(h)
    dead = diag == 0
    diag[dead] = 1.0
    work[:, dead] = 0.0
    perm = None
    col_block = torch.arange(n, device=device) // bs
    if options.act_order:
        perm = torch.argsort(torch.diagonal(h_given), descending=True, stable=True)
        work, h, col_block = work[:, perm], h[perm][:, perm], col_block[perm]
    # Steps 4-5.
    u, lam, rel, retries = inverse_hessian_factor(h, options.damp, tuple(w.shape))
    state = _Columns(work, u, scales, col_block.tolist(), bs, scheme, tensor_amax, options.scales == "lazy",
                     torch.empty(out, n, dtype=torch.float32, device=device),
                     torch.empty(out, n, dtype=torch.float32, device=device))
    return state, w32, h_given, dead, perm, (lam, rel, retries)


def gptq_weight(
    w: torch.Tensor,
    hessian: torch.Tensor,
    scheme: Scheme,
    rotation: Rotation | None = None,
    options: GPTQOptions | None = None,
) -> GPTQResult:
    """GPTQ-round ``w`` [out, in] with the Hessian ``hessian`` [in, in] of its inputs (rotated inputs when
    ``rotation`` is given: see :class:`HessianAccumulator`), blocks of ``scheme`` along ``in``.

    Returns the fake-quantized weight (float32, in the rotated domain when rotating: what
    ``quantize_torch(w, scheme, rotation=rotation)`` returns for RTN) and diagnostics (:class:`GPTQResult`).
    """
    options = options or GPTQOptions()
    if w.dim() != 2:
        raise ValueError(f"GPTQ takes a 2-D weight [out_features, in_features], got shape {tuple(w.shape)}")
    n = w.shape[1]
    if tuple(hessian.shape) != (n, n):
        raise ValueError(f"GPTQ: the Hessian of a weight of shape {tuple(w.shape)} must be [{n}, {n}], got "
                         f"{tuple(hessian.shape)}")
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError(f"GPTQ: the Hessian of the layer of shape {tuple(w.shape)} has non-finite values")
    state, w32, h_given, dead, perm, (lam, rel, retries) = _prepare(w, hessian, scheme, rotation, options)
    state.run(options.block_columns)  # step 6
    # Step 7.
    q_out, elements = state.q_out, state.elements
    if perm is not None:
        q_out, elements = q_out[:, torch.argsort(perm)], elements[:, torch.argsort(perm)]
    ts = None if state.tensor_amax is None else tensor_scale(state.tensor_amax, scheme.elem)[0]
    w64 = w32.to(torch.float64)
    rtn = quantize_torch(w32, scheme)
    return GPTQResult(
        weight=q_out,
        damping=lam,
        relative_damping=rel,
        cholesky_retries=retries,
        dead_columns=int(dead.sum()),
        hessian_error=_hessian_error(w64 - q_out.to(torch.float64), h_given),
        rtn_hessian_error=_hessian_error(w64 - rtn.to(torch.float64), h_given),
        perm=perm,
        packed=pack_elements(elements, state.scales[2], state.scales[3], scheme, ts),
    )


class HessianAccumulator:
    """Accumulates ``H = 2/n · Σ xᵀx`` over the calibration tokens of one layer's input, in float32.

    ``add(x)`` takes inputs [..., in_features] (rotated first, in float32, when ``rotation`` is given: the
    Hessian is then the rotated inputs', as :func:`gptq_weight` needs it); ``hessian()`` returns
    ``S · fp32(2/n)`` with ``S`` the float32 running sum of ``xᵀx``.
    """

    def __init__(self, in_features: int, rotation: Rotation | None = None, device: torch.device | str | None = None):
        self.in_features = in_features
        self.rotation = rotation
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"HessianAccumulator for {self.in_features} input features got inputs of shape "
                             f"{tuple(x.shape)}")
        x = x.detach().reshape(-1, self.in_features).to(self.sum.device)
        xf = rotate(x, self.rotation) if self.rotation is not None else x.to(torch.float32)
        self.sum.addmm_(xf.T, xf)
        self.tokens += xf.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.tokens == 0:
            raise ValueError("HessianAccumulator: no calibration tokens were added")
        return self.sum * (2.0 / self.tokens)


def unrotate(x: torch.Tensor, rotation: Rotation) -> torch.Tensor:
    """``x Rᵀ`` along the last axis, float32: the inverse of :func:`lm_eval_mx.numerics.rotation.rotate` up to float32
    rounding (``R = diag(s) · blockdiag(Hₙ/√n)`` is orthogonal and ``Hₙ`` symmetric)."""
    xf = x.to(torch.float32)
    n = xf.shape[-1]
    block = rotation.block_for(n)
    y = (fwht(xf.reshape(*xf.shape[:-1], n // block, block)) * norm_scale(block)).reshape(xf.shape)
    return y * signs(rotation.seed, n, y.device) if rotation.seed is not None else y


# ------------------------------------------------------------------------------------------------------------
# Sequential driver: transformer blocks one after another, each calibrated on the outputs of the blocks
# before it with their weights already quantized.


@dataclass
class GPTQLayer:
    """One weight GPTQ rounds: ``module`` has a ``weight`` [out_features, in_features] and receives its input
    as the first positional argument of its forward (``nn.Linear``)."""

    name: str
    module: torch.nn.Module
    scheme: Scheme
    rotation: Rotation | None = None
    min_tokens: int | None = None  # fewer tokens: rounded to nearest (rtn_fallback); None: no tokens is an error


def rtn_fallback(w: torch.Tensor, acc: HessianAccumulator, scheme: Scheme, rotation: Rotation | None,
                 min_tokens: int) -> GPTQResult:
    """Round to nearest for a weight whose Hessian came from fewer than ``min_tokens`` tokens (an expert the router
    rarely picks): GPTQ with the identity Hessian, which is RTN bit for bit (codes and scales as ``mx_pack``
    stores them); the errors are then measured on the Hessian of the tokens it did get (0 with none)."""
    n = w.shape[1]
    res = gptq_weight(w, torch.eye(n, device=w.device), scheme, rotation, GPTQOptions(damp=0.0))
    w32 = rotate(w.detach(), rotation) if rotation is not None else w.detach().to(torch.float32)
    h = acc.hessian().to(torch.float64) if acc.tokens else torch.zeros(n, n, dtype=torch.float64, device=w.device)
    res.hessian_error = res.rtn_hessian_error = _hessian_error(w32.to(torch.float64) - res.weight.to(torch.float64), h)
    res.damping = res.relative_damping = 0.0
    res.tokens = acc.tokens
    res.fallback = f"rtn: {acc.tokens} calibration tokens < min_tokens {min_tokens}"
    return res


def set_fake_quantized_weight(layer: GPTQLayer, result: GPTQResult) -> None:
    """The default ``set_weight`` of :func:`gptq_layers`: the fake-quantized weight, rotated back to the
    original domain when rotating (float32 rounding), written into ``module.weight`` in its dtype, so that the
    blocks calibrated after it see this layer's quantized weight."""
    w = result.weight if layer.rotation is None else unrotate(result.weight, layer.rotation)
    with torch.no_grad():
        layer.module.weight.copy_(w.to(layer.module.weight.dtype))


def gptq_layers(
    blocks: Sequence[torch.nn.Module],
    run_block: Callable[[int, torch.nn.Module, Any], Any],
    layers: Callable[[int, torch.nn.Module], Sequence[Sequence[GPTQLayer]]],
    inputs: Iterable[Any],
    options: GPTQOptions | None = None,
    set_weight: Callable[[GPTQLayer, GPTQResult], None] = set_fake_quantized_weight,
    on_layer: Callable[[GPTQLayer, GPTQResult], None] | None = None,
) -> dict[str, GPTQResult]:
    """GPTQ over a model's blocks in order, each block calibrated on the outputs of the blocks before it, whose
    weights are already quantized (as in GPTQ's and llm-compressor's sequential pipelines).

    ``blocks``: the transformer blocks; ``inputs``: the calibration inputs of the first block, one item per
    calibration batch (whatever ``run_block`` takes); ``run_block(i, block, item)``: runs block ``i`` on one item
    and returns the item the next block takes. ``layers(i, block)``: the block's weights as groups of
    :class:`GPTQLayer`, in order: each group's Hessians are collected in one pass over the block's inputs with
    the groups before it already quantized (``[[q, k, v], [o], [gate, up], [down]]`` is "true sequential";
    one group holding every layer calibrates them all on the block's unquantized forward). ``set_weight``
    writes a result into its layer (default: :func:`set_fake_quantized_weight`); ``on_layer`` is called after
    each (progress, logging). A layer with ``min_tokens`` set that saw fewer tokens is rounded to nearest
    (:func:`rtn_fallback`, recorded in its result). Returns the results by layer name. Runs under
    ``torch.no_grad()``.
    """
    items = list(inputs)
    if not items:
        raise ValueError("gptq_layers needs at least one calibration input")
    results: dict[str, GPTQResult] = {}
    with torch.no_grad():
        for i, block in enumerate(blocks):
            for group in layers(i, block):
                accs: dict[str, HessianAccumulator] = {}
                hooks = []
                for layer in group:
                    if layer.name in results or layer.name in accs:
                        raise ValueError(f"gptq_layers: layer {layer.name!r} named twice")
                    weight = layer.module.weight
                    acc = accs[layer.name] = HessianAccumulator(weight.shape[1], layer.rotation, weight.device)
                    hooks.append(layer.module.register_forward_pre_hook(
                        lambda _m, args, acc=acc: acc.add(args[0])))
                try:
                    for item in items:
                        run_block(i, block, item)
                finally:
                    for hook in hooks:
                        hook.remove()
                for layer in group:
                    acc = accs[layer.name]
                    if acc.tokens == 0 and layer.min_tokens is None:
                        raise ValueError(f"gptq_layers: layer {layer.name!r} saw no calibration tokens "
                                         f"(is it run by block {i}?)")
                    if layer.min_tokens is not None and acc.tokens < layer.min_tokens:
                        result = rtn_fallback(layer.module.weight, acc, layer.scheme, layer.rotation, layer.min_tokens)
                    else:
                        result = gptq_weight(layer.module.weight, acc.hessian(), layer.scheme, layer.rotation, options)
                        result.tokens = acc.tokens
                    set_weight(layer, result)
                    results[layer.name] = result
                    if on_layer is not None:
                        on_layer(layer, result)
            items = [run_block(i, block, item) for item in items]
    return results

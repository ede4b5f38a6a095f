"""Block Hadamard rotations: ``x @ H`` along a matmul's reduction axis, with ``H`` orthogonal.

Rotating activations and weights by the same ``H`` leaves their product unchanged
(``(xH)(WH)ᵀ = xWᵀ``) but spreads outliers over each block before quantization.
``H`` is block-diagonal: each block of ``n`` consecutive positions (a power of two) gets
the Sylvester Hadamard matrix (H₁ = [1], H₂ₙ = [[Hₙ, Hₙ], [Hₙ, -Hₙ]]) divided by √n,
optionally preceded by random signs (``seed``), so ``H = diag(s) · blockdiag(Hₙ/√n)``.

The arithmetic is fixed, so every backend computes the same bits: in float32,
``y = FWHT(s ⊙ x) · fp32(1/√n)``, where the fast Walsh-Hadamard transform runs its
butterflies ``(a, b) → (a + b, a - b)`` on pairs ``h`` apart, ``h = 1, 2, 4, …, n/2``
in that order; the final multiply is exact when ``n`` is a power of four.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .formats import is_power_of_two


@dataclass(frozen=True)
class Rotation:
    """A block Hadamard rotation of ``block`` positions (a power of two; 0: the whole reduction
    dimension, see :func:`block_for`); ``seed``: random signs."""

    block: int
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.block != 0 and not is_power_of_two(self.block):
            raise ValueError(f"rotation_block must be a power of two (or 0: the whole dimension), got {self.block}")

    def block_for(self, dim: int) -> int:
        """The block used on a reduction dimension ``dim``; a clear error where it does not divide ``dim``."""
        block = block_for(dim, self.block)
        if dim % block:
            raise ValueError(f"rotation block {block} does not divide the reduction dimension {dim}")
        return block

    def label(self) -> str:
        return ("Hfull" if self.block == 0 else f"H{self.block}") + (f"±{self.seed}" if self.seed is not None else "")


def block_for(dim: int, block: int) -> int:
    """The rotation block for a reduction dimension ``dim``: ``block``, or for ``block=0`` the whole
    dimension when it is a power of two, else its largest power-of-two divisor (recorded in the report)."""
    return dim & -dim if block == 0 else block


@torch.compiler.assume_constant_result  # a Python number under torch.compile, not a traced .item()
def norm_scale(block: int) -> float:
    """fp32(1/√n), the normalisation (one rounding; exact when n is a power of four)."""
    return float(torch.tensor(1.0 / math.sqrt(block), dtype=torch.float32))


@functools.cache
def _signs(seed: int, n: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (n,), generator=g, dtype=torch.int32) * 2 - 1).to(torch.float32).to(device)


@torch.compiler.assume_constant_result  # under torch.compile: the cached tensor, no generator traced
def signs(seed: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The ±1 signs of positions 0..n-1: ``torch.randint(0, 2, (n,))`` from ``torch.Generator().manual_seed(seed)``
    (cached per device: a rotation in every forward must not copy them each time)."""
    return _signs(seed, n, torch.device(device))


def hadamard(n: int) -> torch.Tensor:
    """The Sylvester Hadamard matrix Hₙ (entries ±1, float64), for tests and references."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh-Hadamard transform of the last axis (a power of two): ``x @ Hₙ``,
    butterflies on pairs ``h = 1, 2, …, n/2`` apart, in the dtype of ``x``."""
    n = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < n:
        y = x.reshape(*lead, n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2).reshape(*lead, n)
        h *= 2
    return x


def rotate(x: torch.Tensor, rotation: Rotation, axis: int = -1) -> torch.Tensor:
    """``x`` rotated along ``axis`` in float32 (see the module docstring); the result stays float32."""
    xf = x.to(torch.float32).movedim(axis, -1)
    n = xf.shape[-1]
    block = rotation.block_for(n)
    if rotation.seed is not None:
        xf = xf * signs(rotation.seed, n, xf.device)
    y = fwht(xf.reshape(*xf.shape[:-1], n // block, block)) * norm_scale(block)
    return y.reshape(xf.shape).movedim(-1, axis)

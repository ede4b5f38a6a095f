"""Quantization backends: the same exact function, computed by different engines.

``torch``  : eager torch (:mod:`lm_eval_mx.numerics`), CPU and CUDA; the reference.
``compile``: ``torch.compile`` of the same code (CUDA).
``triton`` : a fused Triton kernel (:mod:`lm_eval_mx.kernels`), CUDA, optional dependency.
``auto``   : ``triton`` for CUDA tensors when Triton imports, else ``torch``.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from typing import Protocol

import torch

from .formats import ElemFormat, Rounding, ScaleMode
from .numerics import quantize_mx_torch


class Quantizer(Protocol):
    def __call__(
        self,
        x: torch.Tensor,
        fmt: ElemFormat,
        block_size: int,
        axis: int,
        rounding: Rounding,
        scale_bits: int,
        scale_mode: ScaleMode,
    ) -> torch.Tensor: ...


def triton_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


@functools.cache
def _compiled() -> Callable[..., torch.Tensor]:
    return torch.compile(quantize_mx_torch, dynamic=True)


def _triton(x: torch.Tensor, *args: object) -> torch.Tensor:
    from .kernels import quantize_mx_triton

    if not x.is_cuda:
        return quantize_mx_torch(x, *args)  # type: ignore[arg-type]
    return quantize_mx_triton(x, *args)  # type: ignore[arg-type]


def _compile(x: torch.Tensor, *args: object) -> torch.Tensor:
    if not x.is_cuda:
        return quantize_mx_torch(x, *args)  # type: ignore[arg-type]
    return _compiled()(x, *args)


def resolve_backend(name: str) -> str:
    """The concrete backend ``auto`` stands for on this machine; errors for unusable ones."""
    if name == "auto":
        return "triton" if triton_available() else "torch"
    if name == "triton" and not triton_available():
        raise ValueError(
            "backend=triton needs CUDA and the 'triton' package (pip install 'lm-eval-mx[gpu]'); "
            "use backend=torch or backend=auto"
        )
    if name not in ("torch", "compile", "triton"):
        raise ValueError(f"unknown backend {name!r}; valid: auto, torch, compile, triton")
    return name


def get_quantizer(name: str) -> Quantizer:
    """The quantize function of a backend (``auto`` resolved)."""
    return {"torch": quantize_mx_torch, "compile": _compile, "triton": _triton}[resolve_backend(name)]  # type: ignore[return-value]

"""Quantization backends: the same exact function, computed by different engines.

``torch`` : eager torch (:mod:`lm_eval_mx.numerics.quantize`), CPU and CUDA; the reference.
``triton``: a one-pass Triton kernel (:mod:`lm_eval_mx.kernels.triton_mx`) for CUDA tensors,
            from the optional ``gpu`` extra; CPU tensors take the torch path.
``auto``  : ``triton`` when CUDA and Triton are available, else ``torch``.

``torch.compile`` of the torch code was measured as an alternative (BENCHMARKS.md)
and is slower than the kernel, so it is not offered.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from typing import Any, Protocol

import torch

from ..numerics.formats import E4M3Steps, ScaleMode, Scheme
from ..numerics.quantize import quantize_torch
from ..numerics.rotation import Rotation
from . import BACKENDS


class Quantizer(Protocol):
    """``x`` rotated (optionally) and fake-quantized with ``scheme`` along ``axis``, in ``x.dtype``."""

    def __call__(self, x: torch.Tensor, scheme: Scheme, axis: int, rotation: Rotation | None = None) -> torch.Tensor: ...


@functools.cache
def triton_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


@functools.cache
def _triton_mx() -> Any:
    """The kernels' module, imported on first use (Triton is optional; a function-level import each call costs)."""
    from . import triton_mx

    return triton_mx


def _triton(x: torch.Tensor, *args: Any) -> torch.Tensor:
    """The Triton kernel for CUDA tensors, the torch path otherwise (same arguments as ``Quantizer``)."""
    if not x.is_cuda or _torch_only(*args[:1]):
        return quantize_torch(x, *args)
    return _triton_mx().quantize_triton(x, *args)


def _torch_only(scheme: Scheme) -> bool:
    """Schemes the Triton kernel does not implement (a stack's own E4M3 step order, auto-round's and Quark's
    ``log2``/``log2_ceil`` scales): the torch reference runs them, on CUDA as on CPU."""
    if scheme.is_mx:
        return scheme.scale_mode in (ScaleMode.LOG2, ScaleMode.LOG2_CEIL)
    return scheme.e4m3_steps is not E4M3Steps.REFERENCE


def resolve_backend(name: str) -> str:
    """The concrete backend ``auto`` stands for on this machine; errors for unusable ones."""
    if name == "auto":
        return "triton" if triton_available() else "torch"
    if name == "triton" and not triton_available():
        raise ValueError(
            "mx_backend=triton needs CUDA and the 'triton' package (pip install 'lm-eval-mx[gpu]'); "
            "use mx_backend=torch or mx_backend=auto"
        )
    if name not in BACKENDS:
        raise ValueError(f"unknown mx_backend {name!r}; valid: {', '.join(BACKENDS)}")
    return name


def get_quantizer(name: str) -> Quantizer:
    """The quantize function of a backend (``auto`` resolved)."""
    return {"torch": quantize_torch, "triton": _triton}[resolve_backend(name)]  # type: ignore[return-value]


def get_act_quantizer(name: str, scheme: Scheme, rotation: Rotation | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``get_quantizer(name)(x, scheme, -1, rotation)`` as a function of ``x`` alone, everything else resolved now:
    an input quantizer's call does only what depends on the tensor (its row length, dtype and size). Schemes the
    kernel does not implement (:func:`_torch_only`) get the torch reference, on CUDA as on CPU."""
    if resolve_backend(name) == "torch" or _torch_only(scheme):
        return functools.partial(quantize_torch, scheme=scheme, axis=-1, rotation=rotation)
    return _triton_mx().ActQuantizer(scheme, rotation)

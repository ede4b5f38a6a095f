"""``MXSpec``: the resolved numerics of one layer (weight and input schemes, rotation, backend),
and the quantization of inputs shared by sibling layers fed the same tensor.
"""



from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..kernels.backends import Quantizer, get_act_quantizer, get_quantizer
from ..numerics.formats import Scheme, TensorScale
from ..numerics.quantize import make_scheme, quantize_torch
from ..numerics.rotation import Rotation, rotate
from ..numerics.runtimes import get_rule


@dataclass(frozen=True)
class MXSpec:
    """Resolved numerics of one layer: weight and activation schemes (None: weight-only), the
    rotation applied to both along the reduction axis, and the backend."""

    w: Scheme
    a: Scheme | None
    rotation: Rotation | None = None
    backend: str = "auto"
    # The stored per-tensor scale of the inputs when ``a.tensor_scale`` is ``static`` (float32 value, a divisor:
    # calibrated amax / (448·6); for ``a.e4m3_steps=divide`` compressed-tensors' multiplier, its reciprocal); None
    # otherwise.
    a_scale: float | None = None
    # A shipped checkpoint's runtime arithmetic for the inputs, by name in :data:`lm_eval_mx.numerics.runtimes.RULES`
    # (``a`` then names the format; ``a_scale`` is the stored value as the rule takes it); None: ``a``'s own.
    a_rule: str | None = None

    def __post_init__(self) -> None:
        static = self.a is not None and self.a.tensor_scale is TensorScale.STATIC
        if static != (self.a_scale is not None):
            raise ValueError("MXSpec: a_scale (the stored input scale) goes with an activation scheme of "
                             "tensor_scale=static, and only with one")
        if self.a_rule is not None:
            get_rule(self.a_rule)  # a ValueError naming the known rules
            if self.a is None:
                raise ValueError(f"MXSpec: a_rule={self.a_rule!r} quantizes inputs; it needs the activation scheme a")

    @classmethod
    def make(
        cls,
        w_format: str,
        a_format: str | None,
        block_size: int = 32,
        rounding: str = "even",
        scale_bits: int = 8,
        scale_mode: str = "floor",
        backend: str = "auto",
        rotation: Rotation | None = None,
    ) -> MXSpec:
        """From element format names under one block size and E8M0 scale settings (tests and benchmarks; layers
        get theirs from :func:`lm_eval_mx.selection.apply.layer_spec`)."""

        def scheme(name: str) -> Scheme:
            return make_scheme(name, block_size, rounding, scale_bits, scale_mode)

        return cls(scheme(w_format), None if a_format is None else scheme(a_format), rotation, backend)

    @functools.cached_property
    def quantizer(self) -> Quantizer:
        return get_quantizer(self.backend)

    @functools.cached_property
    def act_quantizer(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The input quantizer, ``quantizer(x, a, -1, rotation)`` with all but ``x`` resolved once."""
        return get_act_quantizer(self.backend, self.a, self.rotation)  # type: ignore[arg-type]

    def weight(self, w: torch.Tensor, axis: int) -> torch.Tensor:
        """The weight rotated and quantized along its reduction axis (a per-tensor scale: per matrix,
        so per expert for 3-D expert weights)."""
        if self.w.tensor_scale is TensorScale.AMAX and w.dim() == 3:
            return torch.stack([self.weight(e, axis if axis < 0 else axis - 1) for e in w])
        return self.quantizer(w, self.w, axis, self.rotation)

    def act(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate and quantize an input along its last axis; siblings fed the same tensor share one result."""
        if self.a is None:
            return x if self.rotation is None else rotate(x, self.rotation).to(x.dtype)
        # under torch.compile identity and versions are the tracer's: quantize without the sibling cache
        # inference tensors have no version counter: an in-place change could not be seen
        compiling = torch.compiler.is_compiling()
        if compiling or x.is_inference():
            return self._act(x, compiling)
        key = (self.a, self.rotation, self.backend, self.a_scale, self.a_rule)  # every field the result depends on
        hit = _LAST_ACT.get("entry")
        if hit is not None and hit[0]() is x and hit[1] == x._version and hit[2] == key:
            return hit[3]
        xq = self._act(x, False)
        _LAST_ACT["entry"] = (weakref.ref(x), x._version, key, xq)
        return xq

    def _act(self, x: torch.Tensor, compiling: bool) -> torch.Tensor:
        """:meth:`act` without the sibling cache."""
        if self.a_rule is not None:
            xr = x if self.rotation is None else rotate(x, self.rotation).to(x.dtype)
            return get_rule(self.a_rule)(xr, self.a, self.a_scale)
        if self.a_scale is not None:  # a stored input scale: the torch reference (on CPU and CUDA alike)
            return quantize_torch(x, self.a, -1, self.rotation, static_scale=self.a_scale)
        # traced: the general quantizer, which dynamo traces (act_quantizer's host shortcuts are for eager calls)
        if compiling:
            return self.quantizer(x, self.a, -1, self.rotation)
        return self.act_quantizer(x)

    def describe(self) -> str:
        a = self.a.name if self.a else "-"
        if self.a_rule is not None:
            a += f"[{self.a_rule}]"
        if self.a_scale is not None:
            a += f"({self.a_scale:.6g})"
        rot = f", rot={self.rotation.label()}" if self.rotation else ""
        return f"w={self.w.name}, a={a}{rot}"


# The last quantized activation: q/k/v and gate/up projections read the same input tensor,
# so it is quantized once. Keyed by identity and version of the input (weakly held).
_LAST_ACT: dict[str, tuple] = {}



"""Element formats, rounding and scale modes, and the ``Scheme`` that combines them: one table of each.

A quantization scheme is an element format, a block size, the format of the block
scales (E8M0 powers of two as in OCP MX, or float8 E4M3 as in NVFP4), an optional
per-tensor float32 scale, the element rounding and, for E8M0, how the shared
exponent is derived. Every layer of the package takes a ``Scheme``.

Everything here is plain Python (no torch) so that configuration can be validated
before any heavy import or model load.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from typing import TypeVar


@dataclass(frozen=True)
class ElemFormat:
    """An MX element format (OCP MX v1.0 / microxcaling semantics).

    ``mbits`` counts explicit mantissa bits (fractional bits for the integer
    formats, which are sign-magnitude fixed point with ``emax == 0``).
    """

    name: str
    bits: int
    ebits: int
    mbits: int
    emax: int
    max_normal: float

    @property
    def is_int(self) -> bool:
        return self.ebits == 0

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal value (0 for the integer formats)."""
        return 0 if self.is_int else 2 - 2 ** (self.ebits - 1)

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (self.emin - self.mbits)


# The single format table. emax/max_normal follow microxcaling's _get_format_params.
FORMATS: dict[str, ElemFormat] = {
    f.name: f
    for f in (
        ElemFormat("fp8_e4m3", 8, 4, 3, 8, 448.0),
        ElemFormat("fp8_e5m2", 8, 5, 2, 15, 57344.0),
        ElemFormat("fp6_e3m2", 6, 3, 2, 4, 28.0),
        ElemFormat("fp6_e2m3", 6, 2, 3, 2, 7.5),
        ElemFormat("fp4_e2m1", 4, 2, 1, 2, 6.0),
        ElemFormat("int8", 8, 0, 6, 0, 127 / 64),
        ElemFormat("int4", 4, 0, 2, 0, 1.75),
        ElemFormat("int2", 2, 0, 0, 0, 1.0),
    )
}

# The OCP MX v1.0 scheme names (block 32, E8M0 scales) and their element formats: named schemes
# (NAMED_SCHEMES) and aliases of the element formats alike.
MX_NAMES: dict[str, str] = {
    "mxfp8": "fp8_e4m3",
    "mxfp8_e5m2": "fp8_e5m2",
    "mxfp6_e2m3": "fp6_e2m3",
    "mxfp6_e3m2": "fp6_e3m2",
    "mxfp4": "fp4_e2m1",
    "mxint8": "int8",
    "mxint4": "int4",
    "mxint2": "int2",
}

# What users type, mapped to canonical names (lower-cased, '-' read as '_').
ALIASES: dict[str, str] = {
    **MX_NAMES,
    "mxfp8_e4m3": "fp8_e4m3",
    "fp8": "fp8_e4m3",
    "e4m3": "fp8_e4m3",
    "float8_e4m3fn": "fp8_e4m3",
    "e5m2": "fp8_e5m2",
    "float8_e5m2": "fp8_e5m2",
    "mxfp6": "fp6_e2m3",
    "fp6": "fp6_e2m3",
    "e2m3": "fp6_e2m3",
    "e3m2": "fp6_e3m2",
    "mxfp4_e2m1": "fp4_e2m1",
    "fp4": "fp4_e2m1",
    "e2m1": "fp4_e2m1",
}


class ScaleFormat(str, Enum):
    """Format of the per-block scales.

    ``e8m0``: a power of two (OCP MX), derived from the block maximum's exponent;
    ``e4m3``: a float8 E4M3 value (NVFP4), the block maximum over the element's
    largest value rounded to E4M3.
    """

    E8M0 = "e8m0"
    E4M3 = "e4m3"
    # No block scales: the elements are scaled by one stored per-tensor float32 scale only (FP8 static per-tensor
    # activations, e.g. an AMD Quark checkpoint's ``input_scale``); needs tensor_scale=static and block_size=0.
    NONE = "none"


class TensorScale(str, Enum):
    """Second-level scale: ``none``, ``amax`` (a float32 per-tensor scale from the tensor's absolute
    maximum, so that E4M3 block scales use E4M3's whole range; activations: per input tensor, dynamically),
    or ``static`` (a float32 per-tensor scale given from outside, e.g. one a checkpoint stores for a layer's
    inputs: the block scales are computed relative to it, whatever the tensor's own maximum; see the
    docs/numerics.md, *Static per-tensor scales*)."""

    NONE = "none"
    AMAX = "amax"
    STATIC = "static"


class Rounding(str, Enum):
    """Element rounding: ``nearest`` (ties away), ``even`` (ties to even), ``floor`` (toward zero)."""

    NEAREST = "nearest"
    EVEN = "even"
    FLOOR = "floor"


class ScaleMode(str, Enum):
    """How the shared E8M0 exponent is derived from the block maximum.

    ``floor`` is OCP MX v1.0 (microxcaling, the golden data); ``ceil`` and
    ``even`` follow torchao; ``rceil`` is NVIDIA Blackwell cuBLAS/cuDNN; ``log2`` is auto-round's
    ``floor(torch.log2(amax))`` (:func:`lm_eval_mx.numerics.quantize.log2_exponent`), which rounds a block maximum a
    few float32 ulps below a power of two up to it where ``floor`` takes its exponent bits (also AMD Quark 0.13's
    ``scale_calculation_mode: floor``); ``log2_ceil`` is Quark's ``scale_calculation_mode: ceil``,
    ``ceil(torch.log2(amax))`` (the same function), which rounds a block maximum a few ulps above a power of two
    down to it where ``ceil`` goes up.
    """

    FLOOR = "floor"
    CEIL = "ceil"
    EVEN = "even"
    RCEIL = "rceil"
    LOG2 = "log2"
    LOG2_CEIL = "log2_ceil"


class E4M3Steps(str, Enum):
    """The order of operations of an E4M3-scale (NVFP4) quantization step; each is one stack's float32 arithmetic
    (docs: *Profiles*). ``ts`` is the per-tensor scale as a divisor (``amax / 2688``), ``gs`` as a multiplier.

    ``reference``: s = e4m3((bmax / 6) / ts); x · ((1 / ts) / s); dequantized q · (ts · s) (hf-mx, torchao less
    its clamp). ``clamp``: the same with (bmax / 6) / ts clamped to [2**-6, 448] before rounding to E4M3
    (torchao 0.18 ``nvfp4_quantize``). ``divide``: gs = 2688 / amax, s = e4m3(gs · (bmax / 6)), a zero s read as
    0.125, x / (s / gs); dequantized q · (s / gs) (compressed-tensors 0.20 ``calculate_qparams``/``_quantize``).
    ``kernel``: NVIDIA's FP4 quantize kernel (vLLM ``cvt_warp_fp16_to_fp4``, FlashInfer, TensorRT-LLM), for
    activations: s = e4m3(gs · (bmax · rcp(6))); o = rcp(s · rcp(gs)) (0 where s is 0); x · o; dequantized
    q · (s · rcp(gs)); ``rcp`` is PTX ``rcp.approx.ftz.f32``, modelled as the correctly rounded reciprocal with
    subnormals flushed (docs: *Profiles* says what is verified of that model). Weights of such a scheme are
    quantized offline by the checkpoint's tool: :meth:`Scheme.for_weights` gives ``divide`` (llm-compressor).
    ``quark``: AMD Quark 0.13's static NVFP4 inputs, a stored divisor ``ts`` (``input_scale_2``): s = e4m3((bmax / 6)
    / ts) as ``reference``; elements x / (ts · s), the product rounded first (one correctly rounded float32 division);
    dequantized q · (ts · s); only with ``tensor_scale=static``.
    """

    REFERENCE = "reference"
    CLAMP = "clamp"
    DIVIDE = "divide"
    KERNEL = "kernel"
    QUARK = "quark"


def _choices(values: object) -> str:
    return ", ".join(sorted(values))  # type: ignore[call-overload]


def get_format(name: str | ElemFormat) -> ElemFormat:
    """Resolve a canonical name or alias; ``ValueError`` lists the valid names."""
    if isinstance(name, ElemFormat):
        return name
    key = str(name).strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in FORMATS:
        raise ValueError(
            f"unknown MX element format {name!r}; valid formats: {_choices(FORMATS)} "
            f"(aliases: {_choices(ALIASES)})"
        )
    return FORMATS[key]


_E = TypeVar("_E", Rounding, ScaleMode, ScaleFormat, TensorScale, E4M3Steps)


def _member(enum: type[_E], name: str | _E, what: str) -> _E:
    try:
        return enum(str(getattr(name, "value", name)).strip().lower())
    except ValueError:
        raise ValueError(f"unknown {what} {name!r}; valid: {_choices(m.value for m in enum)}") from None


def get_rounding(name: str | Rounding) -> Rounding:
    return _member(Rounding, name, "rounding")


def get_scale_mode(name: str | ScaleMode) -> ScaleMode:
    return _member(ScaleMode, name, "scale_mode")


def get_scale_format(name: str | ScaleFormat) -> ScaleFormat:
    return _member(ScaleFormat, name, "scale_format")


def get_tensor_scale(name: str | TensorScale) -> TensorScale:
    return _member(TensorScale, name, "tensor_scale")


def get_e4m3_steps(name: str | E4M3Steps) -> E4M3Steps:
    return _member(E4M3Steps, name, "e4m3_steps")


# The float8 format E4M3 block scales are rounded to (OCP E4M3: max 448, subnormals down to 2**-9).
E4M3 = FORMATS["fp8_e4m3"]


@dataclass(frozen=True)
class Scheme:
    """How one tensor is quantized, along one axis (see docs/numerics.md for the arithmetic).

    ``block_size=0`` is one block per row. ``scale_bits`` and ``scale_mode`` belong to E8M0
    scales; a tensor scale only to E4M3 scales (E8M0 scales need none: they span 2**±127).
    """

    elem: ElemFormat
    block_size: int = 32
    scale_format: ScaleFormat = ScaleFormat.E8M0
    tensor_scale: TensorScale = TensorScale.NONE
    rounding: Rounding = Rounding.EVEN
    scale_mode: ScaleMode = ScaleMode.FLOOR
    scale_bits: int = 8
    # A stack's own order of the E4M3-scale arithmetic (reference: hf-mx's); see E4M3Steps.
    e4m3_steps: E4M3Steps = E4M3Steps.REFERENCE

    def __post_init__(self) -> None:
        if self.e4m3_steps is E4M3Steps.QUARK and (self.tensor_scale is not TensorScale.STATIC
                                                   or self.scale_format is not ScaleFormat.E4M3):
            raise ValueError("e4m3_steps=quark is the element order of a stored static per-tensor scale with E4M3 "
                             "block scales (tensor_scale=static, scale_format=e4m3)")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 0:
            raise ValueError(f"block_size must be an integer >= 0 (0 = the whole row), got {self.block_size!r}")
        if isinstance(self.scale_bits, bool) or not isinstance(self.scale_bits, int) or not 2 <= self.scale_bits <= 8:
            raise ValueError(f"scale_bits must be an integer in 2..8, got {self.scale_bits!r}")
        if self.scale_format is ScaleFormat.NONE:
            if self.tensor_scale is not TensorScale.STATIC or self.block_size != 0 or self.scale_bits != 8 \
                    or self.scale_mode is not ScaleMode.FLOOR:
                raise ValueError("scale_format=none is one stored per-tensor scale and no block scales: it needs "
                                 "tensor_scale=static and block_size=0 (and no E8M0 settings)")
        elif self.scale_format is ScaleFormat.E4M3:
            if self.scale_bits != 8 or self.scale_mode is not ScaleMode.FLOOR:
                raise ValueError("scale_bits and scale_mode shape E8M0 scales; E4M3 scales are rounded to "
                                 "nearest-even E4M3 (use them with scale_format=e8m0)")
        elif self.e4m3_steps is not E4M3Steps.REFERENCE:
            raise ValueError("e4m3_steps orders the arithmetic of E4M3 block scales; it needs scale_format=e4m3")
        elif self.tensor_scale is not TensorScale.NONE:
            raise ValueError("tensor_scale=amax needs scale_format=e4m3: E8M0 block scales are powers of two "
                             "spanning 2**-127..2**127 and take no per-tensor scale")

    @property
    def is_mx(self) -> bool:
        """OCP MX: power-of-two (E8M0) block scales."""
        return self.scale_format is ScaleFormat.E8M0

    def for_weights(self) -> Scheme:
        """The scheme weights take: ``e4m3_steps=kernel`` describes a GEMM kernel's activation step, its weights
        being quantized offline (compressed-tensors' ``divide`` steps); any other scheme is its own."""
        if self.e4m3_steps is E4M3Steps.KERNEL:
            return dataclasses.replace(self, e4m3_steps=E4M3Steps.DIVIDE)
        return self

    def scale_bits_per_block(self) -> int:
        return 0 if self.scale_format is ScaleFormat.NONE else self.scale_bits if self.is_mx else 8

    def bits(self, row: int | None = None) -> float:
        """Storage bits per element, block scales included (the per-tensor scale's 32 bits are
        left out). ``row``: the length of the quantized axis, needed when ``block_size=0``."""
        if self.scale_format is ScaleFormat.NONE:
            return float(self.elem.bits)
        block = self.block_size or row
        if not block:
            raise ValueError("bits of a whole-row scheme (block_size=0) need the row length")
        return self.elem.bits + self.scale_bits_per_block() / block

    def to_dict(self) -> dict[str, object]:
        """What results files record of a scheme: every parameter that shapes its numbers."""
        d: dict[str, object] = {"name": self.name, "elem": self.elem.name, "block_size": self.block_size,
                                "scale_format": self.scale_format.value, "tensor_scale": self.tensor_scale.value,
                                "rounding": self.rounding.value}
        if self.is_mx:
            d.update(scale_mode=self.scale_mode.value, scale_bits=self.scale_bits)
        elif self.e4m3_steps is not E4M3Steps.REFERENCE:
            d["e4m3_steps"] = self.e4m3_steps.value
        if self.block_size:
            d["bits_per_element"] = self.bits()
        return d

    @property
    def name(self) -> str:
        """A fixed scheme's name (``nvfp4``), else the element format with what differs from OCP MX's
        storage, e.g. ``fp4_e2m1``, ``fp4_e2m1/b16``, ``fp4_e2m1/b16/e4m3+amax``."""
        for named in FIXED_SCHEMES:
            if self == NAMED_SCHEMES[named]:
                return named
        parts = [self.elem.name]
        if self.scale_format is ScaleFormat.NONE:
            return f"{self.elem.name}/tensor+static"
        if self.block_size != 32 or not self.is_mx:
            parts.append(f"b{self.block_size}")
        if not self.is_mx:
            parts.append("e4m3" + ("" if self.tensor_scale is TensorScale.NONE else f"+{self.tensor_scale.value}"))
            if self.e4m3_steps is not E4M3Steps.REFERENCE:
                parts.append(self.e4m3_steps.value)
        return "/".join(parts)


def _mx(elem: str) -> Scheme:
    return Scheme(FORMATS[elem])


# Named schemes, as `format=` values take them. The MX names are OCP MX v1.0 (block 32, E8M0
# scales); their block and scale keys (block_size, scale_mode, ...) may still be changed.
# NVFP4 fixes its block (16), its scales (E4M3) and its per-tensor scale: changing those needs
# the separate keys (w_format/a_format=fp4_e2m1, block_size, scale_format, tensor_scale).
NAMED_SCHEMES: dict[str, Scheme] = {
    **{name: _mx(elem) for name, elem in MX_NAMES.items()},
    "nvfp4": Scheme(FORMATS["fp4_e2m1"], 16, ScaleFormat.E4M3, TensorScale.AMAX),
}
# Named schemes whose block and scale settings are fixed (the others are element formats in MX).
FIXED_SCHEMES: frozenset[str] = frozenset({"nvfp4"})
# Format values meaning "keep this layer in high precision" (per-layer rules, search candidates).
HIGH_PRECISION: frozenset[str] = frozenset({"bf16", "none"})


def is_power_of_two(n: int) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n > 0 and n & (n - 1) == 0


def canonical_name(name: str) -> str:
    """Lower-cased, '-' read as '_', aliases resolved: the key of FORMATS or NAMED_SCHEMES."""
    key = str(name).strip().lower().replace("-", "_")
    if key in NAMED_SCHEMES and key in FIXED_SCHEMES:
        return key
    return ALIASES.get(key, key)


def check_format_name(name: str, allow_high_precision: bool = False) -> str:
    """The canonical name of an element format or fixed scheme; ``ValueError`` listing the valid ones."""
    key = canonical_name(name)
    if key in FORMATS or key in FIXED_SCHEMES or (allow_high_precision and key in HIGH_PRECISION):
        return key
    extra = f"; high precision: {_choices(HIGH_PRECISION)}" if allow_high_precision else ""
    raise ValueError(
        f"unknown MX element format {name!r}; valid formats: {_choices(FORMATS)}; schemes: "
        f"{_choices(FIXED_SCHEMES)}{extra} (aliases: {_choices(ALIASES)}; `lm-eval-mx formats` lists them)"
        + suggest(key, [*FORMATS, *ALIASES, *FIXED_SCHEMES])
    )


def suggest(key: str, allowed: list[str] | tuple[str, ...]) -> str:
    """" (did you mean ...?)" with the closest allowed names, or ""."""
    import difflib

    close = difflib.get_close_matches(key, list(allowed), n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""

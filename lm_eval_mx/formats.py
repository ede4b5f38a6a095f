"""MX element formats, rounding modes and shared-scale modes: the one table of each.

Everything here is plain Python (no torch) so that configuration can be validated
before any heavy import or model load.
"""

from __future__ import annotations

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

# What users type, mapped to canonical names (lower-cased, '-' read as '_').
ALIASES: dict[str, str] = {
    "mxfp8": "fp8_e4m3",
    "mxfp8_e4m3": "fp8_e4m3",
    "fp8": "fp8_e4m3",
    "e4m3": "fp8_e4m3",
    "float8_e4m3fn": "fp8_e4m3",
    "mxfp8_e5m2": "fp8_e5m2",
    "e5m2": "fp8_e5m2",
    "float8_e5m2": "fp8_e5m2",
    "mxfp6": "fp6_e2m3",
    "mxfp6_e2m3": "fp6_e2m3",
    "e2m3": "fp6_e2m3",
    "mxfp6_e3m2": "fp6_e3m2",
    "e3m2": "fp6_e3m2",
    "mxfp4": "fp4_e2m1",
    "mxfp4_e2m1": "fp4_e2m1",
    "fp4": "fp4_e2m1",
    "e2m1": "fp4_e2m1",
    "mxint8": "int8",
    "mxint4": "int4",
    "mxint2": "int2",
}


class Rounding(str, Enum):
    """Element rounding: ``nearest`` (ties away), ``even`` (ties to even), ``floor`` (toward zero)."""

    NEAREST = "nearest"
    EVEN = "even"
    FLOOR = "floor"


class ScaleMode(str, Enum):
    """How the shared E8M0 exponent is derived from the block maximum.

    ``floor`` is OCP MX v1.0 (microxcaling, the golden data); ``ceil`` and
    ``even`` follow torchao; ``rceil`` is NVIDIA Blackwell cuBLAS/cuDNN.
    """

    FLOOR = "floor"
    CEIL = "ceil"
    EVEN = "even"
    RCEIL = "rceil"


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


_E = TypeVar("_E", Rounding, ScaleMode)


def _member(enum: type[_E], name: str | _E, what: str) -> _E:
    try:
        return enum(str(getattr(name, "value", name)).strip().lower())
    except ValueError:
        raise ValueError(f"unknown {what} {name!r}; valid: {_choices(m.value for m in enum)}") from None


def get_rounding(name: str | Rounding) -> Rounding:
    return _member(Rounding, name, "rounding")


def get_scale_mode(name: str | ScaleMode) -> ScaleMode:
    return _member(ScaleMode, name, "scale_mode")

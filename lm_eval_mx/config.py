"""``MXConfig``: everything that says which matmuls run in MX and how; one parser of user arguments.

Plain Python (no torch), so a bad ``model_args`` value fails before any model load.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .formats import FORMATS, get_format, get_rounding, get_scale_mode

ROLES: tuple[str, ...] = (
    "attn_qkv",
    "attn_out",
    "mlp_up",
    "mlp_down",
    "experts",
    "router",
    "lm_head",
    "other",
)
# Named groups of roles, usable wherever a role is (roles=..., role_formats=...).
ROLE_GROUPS: dict[str, tuple[str, ...]] = {
    "mlp": ("mlp_up", "mlp_down", "experts"),
    "attn": ("attn_qkv", "attn_out"),
    "all": ("attn_qkv", "attn_out", "mlp_up", "mlp_down", "experts"),
    "none": (),
}
# Quantization engines (lm_eval_mx.backends); all give bit-identical results.
BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")
# How packed weights meet activations on CUDA (Triton): "dequant" decodes each weight to the activation
# dtype with a Triton kernel, then cuBLAS multiplies (bit-identical to fake quantization);
# "fused" decodes inside a Triton GEMM's main loop (no bf16 copy of the weight; slower, BENCHMARKS.md).
PACKED_GEMMS: tuple[str, ...] = ("dequant", "fused")


def _as_list(value: Any) -> list[str]:
    """A list from a Python list/tuple or lm-eval's CLI form ``a|b``."""
    if value is None:
        return []
    if isinstance(value, (list, tuple, set)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [v.strip() for v in str(value).split("|") if v.strip()]


def expand_roles(value: Any, what: str = "roles") -> tuple[str, ...]:
    """Role names and group names (``mlp``, ``attn``, ``all``, ``none``) to a tuple of roles."""
    out: list[str] = []
    for item in _as_list(value):
        key = item.lower()
        if key in ROLE_GROUPS:
            out.extend(ROLE_GROUPS[key])
        elif key in ROLES:
            out.append(key)
        else:
            raise ValueError(
                f"{what}: unknown role {item!r}; valid: {', '.join(ROLES)} "
                f"or groups {', '.join(ROLE_GROUPS)}"
            )
    return tuple(dict.fromkeys(out))


def _as_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"{key} must be True or False, got {value!r}")


def _as_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{key} must be an integer, got {value!r}") from None


@dataclass(frozen=True)
class MXConfig:
    """Which linear layers run in MX, in which formats, with which numerics.

    Defaults: MXFP8 (fp8_e4m3) weights and activations on attention and MLP
    projections, blocks of 32, round-half-even elements, OCP floor scales.
    ``roles=()`` selects nothing (MX off: the model is left untouched).
    ``packed=True`` stores the selected weights as packed MX codes, quantized while
    the checkpoint loads (:mod:`lm_eval_mx.hf_quantizer`), instead of bf16 copies.
    """

    w_format: str = "fp8_e4m3"
    a_format: str = "fp8_e4m3"
    block_size: int = 32
    rounding: str = "even"
    scale_bits: int = 8
    scale_mode: str = "floor"
    roles: tuple[str, ...] = ROLE_GROUPS["all"]
    include: str | None = None
    exclude: str | None = None
    role_formats: dict[str, str] = field(default_factory=dict)
    weight_only: bool = False
    attn_bmm: bool = False
    bmm_format: str | None = None
    backend: str = "auto"
    packed: bool = False
    packed_gemm: str = "dequant"

    def __post_init__(self) -> None:
        # Canonicalise so that equal configurations compare and serialise equal.
        set_ = object.__setattr__
        set_(self, "w_format", get_format(self.w_format).name)
        set_(self, "a_format", get_format(self.a_format).name)
        set_(self, "rounding", get_rounding(self.rounding).value)
        set_(self, "scale_mode", get_scale_mode(self.scale_mode).value)
        set_(self, "roles", expand_roles(self.roles))
        if self.packed_gemm not in PACKED_GEMMS:
            raise ValueError(f"packed_gemm must be one of {', '.join(PACKED_GEMMS)}, got {self.packed_gemm!r}")
        if self.packed_gemm != "dequant" and not self.packed:
            raise ValueError("packed_gemm chooses how packed weights are multiplied: it needs packed=True")
        if self.packed and not self.selects_layers:
            raise ValueError("packed=True stores the selected layers' weights packed, but no layer is selected")
        if self.bmm_format is not None:
            if not self.attn_bmm:
                raise ValueError("bmm_format is the format of the attention matmuls: it needs attn_bmm=True")
            set_(self, "bmm_format", get_format(self.bmm_format).name)
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 0:
            raise ValueError(f"block_size must be an integer >= 0 (0 = whole row), got {self.block_size!r}")
        if isinstance(self.scale_bits, bool) or not isinstance(self.scale_bits, int) or not 2 <= self.scale_bits <= 8:
            raise ValueError(f"scale_bits must be an integer in 2..8, got {self.scale_bits!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        for key in ("include", "exclude"):
            pattern = getattr(self, key)
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise ValueError(f"{key}: invalid regular expression {pattern!r}: {e}") from None
        formats: dict[str, str] = {}
        for key, fmt in dict(self.role_formats).items():
            expand_roles(key, "role_formats")  # validates the role or group name
            formats[str(key).lower()] = get_format(fmt).name
        set_(self, "role_formats", formats)

    @property
    def selects_layers(self) -> bool:
        """True when some linear layer is meant to be selected (roles or a pattern)."""
        return bool(self.roles) or self.include is not None

    @property
    def enabled(self) -> bool:
        """False when nothing at all is in MX (the model is left untouched)."""
        return self.selects_layers or self.attn_bmm

    @property
    def attn_bmm_format(self) -> str:
        """Format of the attention matmul operands (``bmm_format``, else ``a_format``)."""
        return self.bmm_format or self.a_format

    def formats_for(self, role: str) -> tuple[str, str | None]:
        """(weight format, activation format or None in weight-only mode) for a role."""
        # a role's own entry wins over a group's (mlp, attn, all)
        keys = [role] + [g for g, members in ROLE_GROUPS.items() if role in members]
        fmt = next((self.role_formats[k] for k in keys if k in self.role_formats), None)
        w, a = (fmt, fmt) if fmt else (self.w_format, self.a_format)
        return w, (None if self.weight_only else a)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["roles"] = list(self.roles)
        return d

    def label(self) -> str:
        """Short human label naming only what differs from the defaults, e.g. ``fp4_e2m1 mlp``."""
        if not self.enabled:
            return "baseline"
        fmt = self.w_format if self.w_format == self.a_format else f"w:{self.w_format}/a:{self.a_format}"
        parts = [f"w:{self.w_format} weight-only" if self.weight_only else fmt]
        parts += [f"{r}:{f}" for r, f in self.role_formats.items()]
        defaults = {"block_size": 32, "rounding": "even", "scale_bits": 8, "scale_mode": "floor"}
        tags = {"block_size": "b{}", "rounding": "round={}", "scale_bits": "e{}m0", "scale_mode": "scale={}"}
        parts += [tags[k].format(getattr(self, k)) for k, v in defaults.items() if getattr(self, k) != v]
        group = next((g for g, r in ROLE_GROUPS.items() if r == self.roles), "|".join(self.roles))
        if group != "all":
            parts.append(group or "no linear")
        if self.attn_bmm:
            parts.append("bmm" if self.attn_bmm_format == fmt else f"bmm:{self.attn_bmm_format}")
        if self.packed:
            parts.append("packed" if self.packed_gemm == "dequant" else f"packed:{self.packed_gemm}")
        if self.include:
            parts.append(f"+/{self.include}/")
        if self.exclude:
            parts.append(f"-/{self.exclude}/")
        return " ".join(parts)


# User-facing keys beyond MXConfig's own fields.
_PRESETS = {"mlp_only": "mlp", "attn_only": "attn"}
_SHORTHANDS = ("format",)
MX_KEYS: tuple[str, ...] = tuple(f.name for f in fields(MXConfig)) + tuple(_PRESETS) + _SHORTHANDS


def parse_mx_args(args: dict[str, Any]) -> tuple[MXConfig, dict[str, Any]]:
    """Split user arguments into an ``MXConfig`` and the rest (for the HF model).

    Values may be Python objects or lm-eval CLI strings (``True``, ``32``,
    lists as ``a|b``, dicts as ``role:fmt|role:fmt``).
    """
    rest = {k: v for k, v in args.items() if k not in MX_KEYS}
    mx = {k: v for k, v in args.items() if k in MX_KEYS}
    kw: dict[str, Any] = {}

    presets = [p for p in _PRESETS if p in mx and _as_bool(p, mx[p])]
    for p in _PRESETS:
        if p in mx:
            _as_bool(p, mx[p])  # validate even when False
    if len(presets) > 1 or (presets and "roles" in mx):
        given = presets + (["roles"] if "roles" in mx else [])
        raise ValueError(f"choose one way to select roles; got {', '.join(given)}")
    if presets:
        kw["roles"] = ROLE_GROUPS[_PRESETS[presets[0]]]
    elif "roles" in mx:
        kw["roles"] = expand_roles(mx["roles"])
    elif mx.get("include") is not None:
        kw["roles"] = ROLES  # a pattern alone selects whatever it matches

    if "format" in mx:
        if "w_format" in mx or "a_format" in mx:
            raise ValueError("format= sets both w_format and a_format; do not combine them")
        kw["w_format"] = kw["a_format"] = str(mx["format"])
    for key in ("w_format", "a_format", "rounding", "scale_mode", "backend", "packed_gemm"):
        if key in mx:
            kw[key] = str(mx[key])
    for key in ("include", "exclude"):
        if key in mx and mx[key] is not None:
            kw[key] = str(mx[key])
    for key in ("block_size", "scale_bits"):
        if key in mx:
            kw[key] = _as_int(key, mx[key])
    for key in ("weight_only", "attn_bmm", "packed"):
        if key in mx:
            kw[key] = _as_bool(key, mx[key])
    if "bmm_format" in mx and mx["bmm_format"] is not None:
        kw["bmm_format"] = str(mx["bmm_format"])
    if "role_formats" in mx:
        value = mx["role_formats"]
        if not isinstance(value, dict):
            pairs = [item.split(":", 1) for item in _as_list(value)]
            if any(len(p) != 2 for p in pairs):
                raise ValueError(f"role_formats must look like 'mlp:fp4_e2m1|attn:fp8_e4m3', got {value!r}")
            value = {k.strip(): v.strip() for k, v in pairs}
        kw["role_formats"] = value
    return MXConfig(**kw), rest


def suggest(key: str, allowed: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""


__all__ = ["BACKENDS", "FORMATS", "MX_KEYS", "ROLES", "ROLE_GROUPS", "MXConfig", "parse_mx_args"]

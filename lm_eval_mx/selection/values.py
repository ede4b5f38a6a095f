"""Parsers of single ``model_args`` values (roles, booleans, integers, patterns, ``pattern:format`` rules) and the
role names they check against.

Plain Python (no torch), so a bad value fails before any model load; :mod:`.config` builds ``MXConfig`` from them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..numerics.formats import FIXED_SCHEMES, HIGH_PRECISION, canonical_name, check_format_name, suggest

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
# The attention matmuls (attn_bmm=True), as rotation_roles names them.
BMM_ROLE = "attn_bmm"
# How packed weights meet activations on CUDA (Triton): "dequant" decodes each weight to the activation
# dtype with a Triton kernel, then cuBLAS multiplies (bit-identical to fake quantization);
# "fused" decodes inside a Triton GEMM's main loop (no bf16 copy of the weight; slower, BENCHMARKS.md).
PACKED_GEMMS: tuple[str, ...] = ("dequant", "fused")
ROTATIONS: tuple[str, ...] = ("none", "hadamard")


def _as_list(value: Any) -> list[str]:
    """A list from a Python list/tuple or lm-eval's CLI form ``a|b``."""
    if value is None:
        return []
    if isinstance(value, (list, tuple, set)):
        return [str(v).strip() for v in value if str(v).strip()]
    return [v.strip() for v in str(value).split("|") if v.strip()]


def expand_roles(value: Any, what: str = "roles", extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Role names and group names (``mlp``, ``attn``, ``all``, ``none``) to a tuple of roles."""
    out: list[str] = []
    items = _as_list(value)
    if len(items) > 1 and "none" in (i.lower() for i in items):
        raise ValueError(f"{what}={'|'.join(items)}: none means no role and cannot be combined with others")
    for item in items:
        key = item.lower()
        if key in ROLE_GROUPS:
            out.extend(ROLE_GROUPS[key])
        elif key in ROLES or key in extra:
            out.append(key)
        else:
            raise ValueError(
                f"{what}: unknown role {item!r}{suggest(key, [*ROLES, *ROLE_GROUPS, *extra])}; valid: "
                f"{', '.join([*ROLES, *extra])} or groups {', '.join(ROLE_GROUPS)}"
            )
    return tuple(dict.fromkeys(out))


def _as_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"{key} must be True or False, got {value!r}")


def _as_int(key: str, value: Any) -> int:
    """An integer from an int, an integral float (lm-eval's CLI reads ``+32`` as 32.0) or a string."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{key} must be an integer, got {value!r}")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{key} must be an integer, got {value!r}") from None


def _as_pattern(key: str, value: Any) -> str:
    """A regular expression (a string, or a compiled pattern's ``.pattern``); numbers are refused, since
    lm-eval's CLI turns ``.1`` into 0.1."""
    if isinstance(value, re.Pattern):
        value = value.pattern
    if isinstance(value, (list, tuple, set, dict)):
        raise ValueError(f"{key} takes one regular expression, got a {type(value).__name__} {value!r}; join "
                         "alternatives with '|' (e.g. 'q_proj|k_proj')")
    if isinstance(value, bool) or (not isinstance(value, str) and not isinstance(value, (int, float))):
        raise ValueError(f"{key} must be a regular expression (a string), got {type(value).__name__} {value!r}")
    if not isinstance(value, str):
        raise ValueError(
            f"{key}={value!r} is not a regular expression: lm-eval's --model_args turns number-like "
            f"values into numbers before hf-mx sees them; write the pattern so it is not a number "
            f"(e.g. '\\.1' instead of '.1')"
        )
    try:
        re.compile(value)
    except re.error as e:
        raise ValueError(f"{key}: invalid regular expression {value!r}: {e}") from None
    return value


def _parse_rules(key: str, value: Any) -> tuple[tuple[str, str], ...]:
    """Ordered ``pattern:format`` rules (a list of pairs, or ``pat:fmt|pat:fmt``; the format follows the
    last ':'), validated: non-empty, compilable, known formats, no pattern twice."""
    if isinstance(value, dict):
        pairs = list(value.items())
    elif isinstance(value, (list, tuple)) and all(isinstance(v, (list, tuple)) for v in value):
        pairs = [tuple(v) for v in value]
    else:
        pairs = []
        for item in _as_list(value):
            pattern, sep, fmt = item.rpartition(":")
            if not sep:
                raise ValueError(f"{key}: expected 'pattern:format' rules separated by '|', got {item!r}")
            pairs.append((pattern, fmt))
    if not pairs:
        raise ValueError(f"{key} is empty")
    rules: list[tuple[str, str]] = []
    for pair in pairs:
        if len(pair) != 2:
            raise ValueError(f"{key}: each rule is (pattern, format), got {pair!r}")
        if pair[1] is None or pair[0] is None:
            raise ValueError(
                f"{key}: rule {pair!r} has {'pattern' if pair[0] is None else 'format'} None; a format is a name "
                f"(an MX format, nvfp4, or the words {' or '.join(sorted(HIGH_PRECISION))} to keep the layer in "
                "high precision)"
            )
        raw = pair[0].pattern if isinstance(pair[0], re.Pattern) else pair[0]  # a compiled regex: its pattern
        pattern, fmt = str(raw).strip(), str(pair[1]).strip()
        if not fmt:
            raise ValueError(f"{key}: rule {pattern!r} has an empty format (after ':'); give a format or "
                             f"{' or '.join(sorted(HIGH_PRECISION))} to keep the layer in high precision")
        if not pattern:
            raise ValueError(f"{key}: a rule has an empty pattern (before ':{fmt}')")
        _as_pattern(f"{key} pattern", pattern)
        if pattern in (p for p, _ in rules):
            raise ValueError(f"{key}: pattern {pattern!r} is given twice")
        rules.append((pattern, check_format_name(fmt, allow_high_precision=True)))
    return tuple(rules)


def read_json(path: Any, what: str, error: type[ValueError] = ValueError) -> Any:
    """A JSON file's content; ``error`` naming ``what`` and the file when it is missing or not JSON."""
    p = Path(str(path))
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise error(f"{what}: no such file {str(p)!r}") from None
    except (OSError, json.JSONDecodeError) as e:
        raise error(f"{what}: cannot read {str(p)!r} as JSON: {e}") from None


# Keys that shape a format's scheme beyond its element format (block, scales, rounding).
SCHEME_KEYS: tuple[str, ...] = ("block_size", "scale_format", "tensor_scale", "rounding", "scale_bits", "scale_mode")
# Keys that a fixed scheme (nvfp4) sets itself.
FIXED_KEYS = ("block_size", "scale_format", "tensor_scale")


def check_fixed_keys(config: Any, names: list[str]) -> None:
    """block_size/scale_format/tensor_scale given while every format in use is a fixed scheme: refused, since
    they would have no effect (as scale_mode/scale_bits are refused where no scale is E8M0)."""
    keys = [k for k in FIXED_KEYS if getattr(config, k) is not None]
    fixed = sorted({canonical_name(n) for n in names})
    if keys and names and all(n in FIXED_SCHEMES for n in fixed):
        raise ValueError(f"{', '.join(keys)} would be ignored: every format in use here ({', '.join(fixed)}) is a "
                         "fixed scheme with its own block size, scale format and tensor scale; drop "
                         f"{'it' if len(keys) == 1 else 'them'}, or give the parts separately (e.g. "
                         "format=fp4_e2m1,block_size=16,scale_format=e4m3,tensor_scale=amax)")

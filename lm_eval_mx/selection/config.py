"""``MXConfig``: everything that says which matmuls run in MX and how; one parser of user arguments.

Plain Python (no torch), so a bad ``model_args`` value fails before any model load. The parsers of single values
and the role names live in :mod:`.values` (re-exported here).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..kernels import BACKENDS
from ..numerics.formats import (
    FIXED_SCHEMES,
    FORMATS,
    HIGH_PRECISION,
    NAMED_SCHEMES,
    E4M3Steps,
    ScaleFormat,
    Scheme,
    TensorScale,
    canonical_name,
    check_format_name,
    get_e4m3_steps,
    get_rounding,
    get_scale_format,
    get_scale_mode,
    get_tensor_scale,
    is_power_of_two,
)
from ..numerics.profiles import get_profile
from .profile import with_profile
from .values import (
    BMM_ROLE,
    FIXED_KEYS,
    PACKED_GEMMS,
    ROLE_GROUPS,
    ROLES,
    ROTATIONS,
    SCHEME_KEYS,
    _as_bool,
    _as_int,
    _as_list,
    _as_pattern,
    _parse_rules,
    check_fixed_keys,
    expand_roles,
    read_json,
)


@dataclass(frozen=True)
class MXConfig:
    """Which linear layers run in MX, in which formats, with which numerics.

    Defaults: MXFP8 (fp8_e4m3, OCP MX: blocks of 32, E8M0 floor scales) weights and
    activations on attention and MLP projections, round-half-even elements.
    Formats are element formats (block and scale keys apply) or fixed schemes (``nvfp4``).
    ``roles=()`` selects nothing (MX off: the model is left untouched).
    ``layer_formats`` are ordered (pattern, format) rules that override the role formats of
    matching layers (``bf16``/``none``: keep the layer in high precision).
    ``packed=True`` stores the selected weights as packed MX codes, quantized while
    the checkpoint loads (:mod:`lm_eval_mx.hf.quantizer`), instead of bf16 copies.
    """

    w_format: str = "fp8_e4m3"
    a_format: str = "fp8_e4m3"
    block_size: int | None = None
    scale_format: str | None = None
    tensor_scale: str | None = None
    rounding: str = "even"
    scale_bits: int | None = None
    scale_mode: str | None = None
    roles: tuple[str, ...] = ROLE_GROUPS["all"]
    include: str | None = None
    exclude: str | None = None
    role_formats: dict[str, str] = field(default_factory=dict)  # also given as (role, format) pairs
    layer_formats: tuple[tuple[str, str], ...] = ()
    weight_only: bool = False
    attn_bmm: bool = False
    bmm_format: str | None = None
    rotation: str = "none"
    rotation_block: int | None = None
    rotation_seed: int | None = None
    rotation_roles: tuple[str, ...] | None = None
    mx_backend: str = "auto"
    packed: bool = False
    packed_gemm: str = "dequant"
    e4m3_steps: str | None = None
    # The stack whose numerics these keys reproduce (``profile=``; :mod:`.profile` sets the keys), or None.
    profile: str | None = None
    # The keys the user gave (parse_mx_args fills it): checks of settings that a model's layers leave unused.
    given: frozenset[str] = field(default=frozenset(), compare=False, repr=False)
    # The role and group names the user wrote in roles= and rotation_roles= (parse_mx_args fills it): each must
    # select a layer of the model, once its layers are known.
    named: dict[str, tuple[str, ...]] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        # Canonicalise so that equal configurations compare and serialise equal.
        set_ = object.__setattr__
        set_(self, "w_format", check_format_name(self.w_format))
        set_(self, "a_format", check_format_name(self.a_format))
        set_(self, "rounding", get_rounding(self.rounding).value)
        for key, get in (("scale_format", get_scale_format), ("tensor_scale", get_tensor_scale),
                         ("scale_mode", get_scale_mode), ("e4m3_steps", get_e4m3_steps)):
            if getattr(self, key) is not None:
                set_(self, key, get(getattr(self, key)).value)
        if self.scale_format == "none":
            raise ValueError("scale_format=none is a checkpoint's stored per-tensor input scale (AMD Quark's static FP8 "
                             "inputs), read from the checkpoint; as a model_args key use e8m0 or e4m3")
        if self.profile is not None:
            set_(self, "profile", get_profile(self.profile).name)
        if self.tensor_scale == "static":
            raise ValueError("tensor_scale=static takes its scale from a checkpoint that stores one (a shipped "
                             "checkpoint's stored input scales: NVFP4's, or Quark's static FP8 inputs), read as the "
                             "checkpoint states; as a model_args key use tensor_scale=amax or none")
        for key in ("block_size", "scale_bits", "rotation_block", "rotation_seed"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{key} must be an integer, got {value!r}")
        if self.block_size is not None and self.block_size < 0:
            raise ValueError(f"block_size must be an integer >= 0 (0 = whole row), got {self.block_size}")
        set_(self, "roles", expand_roles(self.roles))
        for key in ("mx_backend", "packed_gemm"):  # any case, as every other enumerated key
            if isinstance(getattr(self, key), str):
                set_(self, key, getattr(self, key).strip().lower())
        if self.packed_gemm not in PACKED_GEMMS:
            raise ValueError(f"packed_gemm must be one of {', '.join(PACKED_GEMMS)}, got {self.packed_gemm!r}")
        if self.packed_gemm != "dequant" and not self.packed:
            raise ValueError("packed_gemm chooses how packed weights are multiplied: it needs packed=True")
        if self.packed_gemm == "fused" and self.mx_backend == "torch":
            raise ValueError("packed_gemm=fused is a Triton kernel: it cannot run with mx_backend=torch")
        if self.packed and not self.selects_layers:
            raise ValueError("packed=True stores the selected layers' weights packed, but no layer is selected")
        if self.bmm_format is not None:
            if not self.attn_bmm:
                raise ValueError("bmm_format is the format of the attention matmuls: it needs attn_bmm=True")
            set_(self, "bmm_format", check_format_name(self.bmm_format))
        if self.mx_backend not in BACKENDS:
            raise ValueError(f"mx_backend must be one of {', '.join(BACKENDS)}, got {self.mx_backend!r}")
        for key in ("include", "exclude"):
            if getattr(self, key) is not None:
                _as_pattern(key, getattr(self, key))
        formats: dict[str, str] = {}
        items = self.role_formats.items() if isinstance(self.role_formats, dict) else self.role_formats
        for key, fmt in items:
            if not str(key).strip():
                raise ValueError(f"role_formats: a rule names no role (':{fmt}'); valid roles: {', '.join(ROLES)}")
            expand_roles(key, "role_formats")  # validates the role or group name
            name = str(key).strip().lower()
            if name in formats:
                raise ValueError(f"role_formats names {name} more than once; give each role one format")
            if fmt is None or not str(fmt).strip():
                raise ValueError(f"role_formats: {name} has {'format None' if fmt is None else 'an empty format'}; "
                                 f"give it a format, e.g. {name}:fp4_e2m1 (`lm-eval-mx formats` lists them)")
            try:
                formats[name] = check_format_name(fmt)
            except ValueError as e:
                raise ValueError(f"role_formats {name}: {e}") from None
        set_(self, "role_formats", formats)
        set_(self, "layer_formats", _parse_rules("layer_formats", self.layer_formats) if self.layer_formats else ())
        self._check_selection()
        self._check_rotation()
        self._check_schemes()

    def _check_selection(self) -> None:
        """Settings that only act on selected layers, given while nothing (or not their role) is selected."""
        if not self.selects_layers:
            given = [k for k in ("role_formats", "layer_formats", "exclude") if getattr(self, k)]
            if given:
                raise ValueError(f"{', '.join(given)} would be ignored: roles=none selects no linear layer")
            return
        for key in self.role_formats:
            if not set(expand_roles(key)) & set(self.roles):
                raise ValueError(
                    f"role_formats names {key!r}, which is not among the selected roles ({'|'.join(self.roles)}): "
                    "it would be ignored; add it to roles= or drop it"
                )

    def _check_rotation(self) -> None:
        object.__setattr__(self, "rotation", str(self.rotation).strip().lower())
        if self.rotation not in ROTATIONS:
            raise ValueError(f"rotation must be one of {', '.join(ROTATIONS)}, got {self.rotation!r}")
        given = [k for k in ("rotation_block", "rotation_seed", "rotation_roles") if getattr(self, k) is not None]
        if self.rotation == "none":
            if given:
                raise ValueError(f"{', '.join(given)} would be ignored: they need rotation=hadamard")
            return
        if self.rotation_seed is not None and not 0 <= self.rotation_seed < 2**63:
            raise ValueError(f"rotation_seed must be an integer in [0, 2**63), got {self.rotation_seed}")
        if self.rotation_block == 1:
            raise ValueError("rotation_block=1 is the identity (a 1x1 Hadamard block rotates nothing); give a power "
                             "of two >= 2, or 0 (the whole reduction dimension)")
        if self.rotation_block is not None and self.rotation_block != 0 and not is_power_of_two(self.rotation_block):
            raise ValueError(
                f"rotation_block must be a power of two (Sylvester Hadamard blocks) or 0 (the whole reduction "
                f"dimension), got {self.rotation_block}"
            )
        if self.rotation_roles is not None:
            roles = expand_roles(self.rotation_roles, "rotation_roles", extra=(BMM_ROLE,))
            if not roles:
                raise ValueError("rotation_roles is empty: name the roles to rotate (or drop rotation=hadamard)")
            selected = set(self.roles) | ({BMM_ROLE} if self.attn_bmm else set())
            stray = [r for r in roles if r not in selected]
            if stray:
                raise ValueError(
                    f"rotation_roles names {', '.join(stray)}, not in MX here (selected: "
                    f"{'|'.join(sorted(selected)) or 'none'}): a rotation only acts on quantized matmuls"
                )
            object.__setattr__(self, "rotation_roles", roles)
        elif not self.selects_layers and not self.attn_bmm:
            raise ValueError("rotation=hadamard would be ignored: nothing is in MX (roles=none)")

    def _check_schemes(self) -> None:
        """Resolve every format in use now, so conflicts fail before any model load."""
        schemes = [self.scheme(name) for name in self.formats_in_use()]
        if not schemes:
            return
        if self.rotation != "none" and self.rotation_block is None:
            odd = sorted({s.block_size for s in schemes if s.block_size and not is_power_of_two(s.block_size)})
            if odd:
                raise ValueError(f"rotation_block defaults to the block size, {odd[0]}, which is not a power of two; "
                                 "give rotation_block=N (a power of two) or 0 (the whole dimension)")
        check_fixed_keys(self, self.formats_in_use())
        if self.packed and any(s.e4m3_steps is not E4M3Steps.REFERENCE for s in schemes):
            raise ValueError(f"packed=True stores E4M3 scales for hf-mx's reference steps; e4m3_steps="
                             f"{self.e4m3_steps} (a stack's own order) runs as fake quantization only: drop packed")
        mx = [s for s in schemes if s.is_mx]
        for key in ("scale_mode", "scale_bits"):
            if getattr(self, key) is not None and not mx:
                raise ValueError(f"{key} shapes E8M0 (MX) scales, but every format here has E4M3 scales: "
                                 "it would be ignored")
        if self.e4m3_steps is not None and len(mx) == len(schemes):
            raise ValueError("e4m3_steps orders the arithmetic of E4M3 block scales (nvfp4), but every format here has "
                             "E8M0 scales: it would be ignored")

    @property
    def selects_layers(self) -> bool:
        """True when some linear layer is meant to be selected: ``include`` narrows the roles' layers, so
        roles=none selects nothing whatever the pattern."""
        return bool(self.roles)

    @property
    def profile_pending(self) -> bool:
        """A profile given without a format: only a shipped checkpoint (whose format it is) resolves it."""
        return self.profile is not None and not self.given & {"format", "w_format", "a_format"}

    @property
    def enabled(self) -> bool:
        """False when nothing at all is in MX (the model is left untouched)."""
        return self.selects_layers or self.attn_bmm

    @property
    def attn_bmm_format(self) -> str:
        """Format of the attention matmul operands (``bmm_format``, else ``a_format``)."""
        return self.bmm_format or self.a_format

    def formats_in_use(self) -> list[str]:
        """Every format name this configuration may apply (high-precision rules left out)."""
        names: list[str] = []
        if self.selects_layers:
            names.append(self.w_format)
            if not self.weight_only:
                names.append(self.a_format)
            names += list(self.role_formats.values())
            names += [f for _, f in self.layer_formats if f not in HIGH_PRECISION]
        if self.attn_bmm:
            names.append(self.attn_bmm_format)
        return list(dict.fromkeys(names))

    def scheme(self, name: str) -> Scheme:
        """The quantization scheme a format name stands for under this config's block and scale keys."""
        key = canonical_name(name)
        rounding = get_rounding(self.rounding)
        if key in FIXED_SCHEMES:
            base = NAMED_SCHEMES[key]
            for attr in ("block_size", "scale_format", "tensor_scale"):
                given = getattr(self, attr)
                own = getattr(base, attr)
                if given is not None and given != getattr(own, "value", own):
                    raise ValueError(
                        f"{key} fixes {attr}={getattr(own, 'value', own)} but {attr}={given} was given; for another "
                        f"design point give the parts separately, e.g. w_format={base.elem.name},"
                        f"a_format={base.elem.name},block_size=...,scale_format={base.scale_format.value},"
                        f"tensor_scale={base.tensor_scale.value}"
                    )
            return Scheme(base.elem, base.block_size, base.scale_format, base.tensor_scale, rounding,
                          e4m3_steps=self._e4m3_steps(base.scale_format))
        scale_format = get_scale_format(self.scale_format or ScaleFormat.E8M0)
        return Scheme(
            FORMATS[key],
            32 if self.block_size is None else self.block_size,
            scale_format,
            get_tensor_scale(self.tensor_scale or TensorScale.NONE),
            rounding,
            get_scale_mode(self.scale_mode or "floor"),
            8 if self.scale_bits is None else self.scale_bits,
            e4m3_steps=self._e4m3_steps(scale_format),
        )

    def _e4m3_steps(self, scale_format: ScaleFormat) -> E4M3Steps:
        """The E4M3 step order of a scheme with these scales (E8M0 scales have none)."""
        if scale_format is ScaleFormat.E4M3 and self.e4m3_steps is not None:
            return get_e4m3_steps(self.e4m3_steps)
        return E4M3Steps.REFERENCE

    def layer_rule(self, name: str) -> tuple[int, str] | None:
        """(index, format) of the first ``layer_formats`` rule matching a layer name, else None."""
        for i, (pattern, fmt) in enumerate(self.layer_formats):
            if re.search(pattern, name):
                return i, fmt
        return None

    def formats_for(self, role: str, name: str | None = None) -> tuple[str, str | None] | None:
        """(weight format, activation format or None in weight-only mode) of a layer, or None when a
        ``layer_formats`` rule keeps it in high precision. A rule beats ``role_formats``; a role's own
        entry beats a group's (mlp, attn, all)."""
        rule = self.layer_rule(name) if name is not None else None
        if rule is not None:
            if rule[1] in HIGH_PRECISION:
                return None
            w = a = rule[1]
        else:
            keys = [role] + [g for g, members in ROLE_GROUPS.items() if role in members]
            fmt = next((self.role_formats[k] for k in keys if k in self.role_formats), None)
            w, a = (fmt, fmt) if fmt else (self.w_format, self.a_format)
        return w, (None if self.weight_only else a)

    def rotates(self, role: str) -> bool:
        """Whether matmuls of ``role`` (or ``attn_bmm``) are rotated."""
        if self.rotation == "none":
            return False
        return self.rotation_roles is None or role in self.rotation_roles

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["given"], d["named"]
        if self.profile is not None:
            d["profile"] = get_profile(self.profile).to_dict()
        d["roles"] = list(self.roles)
        d["layer_formats"] = [list(r) for r in self.layer_formats]
        d["rotation_roles"] = None if self.rotation_roles is None else list(self.rotation_roles)
        return d

    def label(self) -> str:
        """Short human label naming only what differs from the defaults, e.g. ``fp4_e2m1 mlp``."""
        if not self.enabled:
            return "baseline"
        if self.profile is not None:
            return f"{self.profile}: {dataclasses.replace(self, profile=None, roles=self.roles).label()}"
        fmt = self.w_format if self.w_format == self.a_format else f"w:{self.w_format}/a:{self.a_format}"
        parts = [f"w:{self.w_format} weight-only" if self.weight_only else fmt]
        if self.layer_formats and not self.given & {"format", "w_format", "a_format"}:
            parts = []  # the rules name the formats; the default format may decide no layer
        shown = fmt if parts else None
        parts += [f"{r}:{f}" for r, f in self.role_formats.items()]
        if self.layer_formats:
            n = len(self.layer_formats)
            parts.append(f"{n} layer rule{'s' if n > 1 else ''} ({'/'.join(dict.fromkeys(f for _, f in self.layer_formats))})")
        tags = {"block_size": "b{}", "scale_format": "{}", "tensor_scale": "ts={}", "scale_bits": "e{}m0",
                "scale_mode": "scale={}"}
        skip = {"scale_format"} if self.scale_bits is not None and self.scale_format == "e8m0" else set()  # e{n}m0 says it
        parts += [tag.format(getattr(self, k)) for k, tag in tags.items() if getattr(self, k) is not None and k not in skip]
        if self.rounding != "even":
            parts.append(f"round={self.rounding}")
        group = next((g for g, r in ROLE_GROUPS.items() if r == self.roles), "|".join(self.roles))
        if group != "all":
            parts.append(group or "no linear")
        if self.attn_bmm:
            parts.append("bmm" if self.attn_bmm_format == shown else f"bmm:{self.attn_bmm_format}")
        if self.rotation != "none":
            rot = "rot" + ("" if self.rotation_block is None else ("-full" if self.rotation_block == 0
                                                                   else str(self.rotation_block)))
            rot += "" if self.rotation_seed is None else f"±{self.rotation_seed}"
            rot += "" if self.rotation_roles is None else f"[{'|'.join(self.rotation_roles)}]"
            parts.append(rot)
        if self.packed:
            parts.append("packed" if self.packed_gemm == "dequant" else f"packed:{self.packed_gemm}")
        if self.e4m3_steps is not None:
            parts.append(f"e4m3={self.e4m3_steps}")
        if self.include:
            parts.append(f"+/{self.include}/")
        if self.exclude:
            parts.append(f"-/{self.exclude}/")
        return " ".join(parts)


# User-facing keys beyond MXConfig's own fields.
_PRESETS = {"mlp_only": "mlp", "attn_only": "attn"}
_SHORTHANDS = ("format", "recipe")
MX_KEYS: tuple[str, ...] = tuple(f.name for f in fields(MXConfig) if f.name not in ("given", "named")) + tuple(_PRESETS) + _SHORTHANDS
# MX keys that may be added to a recipe's: how it runs and stores, not the numbers it was measured with.
_BESIDE_RECIPE = ("mx_backend", "packed", "packed_gemm", "attn_bmm", "bmm_format")
# Keys that choose how stored MX weights are computed with, not what they are.
RUN_KEYS: tuple[str, ...] = ("mx_backend", "packed_gemm")
# The one table of the MX keys that may stand beside a checkpoint whose weights are already quantized: "stored",
# a packed MX checkpoint (quant_method mx; its recorded configuration runs as stored); "shipped", another tool's
# (its weights as stored, its recipe's activations unless a_format or weight_only override them; with a_format,
# SCHEME_KEYS shape the activation scheme; profile: the stack's rule for the checkpoint, hf.model._checkpoint_profile).
# Every other MX key would re-quantize or reinterpret the stored weights.
BESIDE_CHECKPOINT: dict[str, frozenset[str]] = {
    "stored": frozenset(RUN_KEYS),
    "shipped": frozenset({*RUN_KEYS, "a_format", "weight_only", "profile"}),
}


def refused_beside_checkpoint(kind: str, given: frozenset[str] | set[str]) -> list[str]:
    """The MX keys of ``given`` that may not stand beside a ``kind`` ("stored" or "shipped") checkpoint, sorted."""
    allowed = BESIDE_CHECKPOINT[kind] | (frozenset(SCHEME_KEYS) if kind == "shipped" and "a_format" in given
                                         else frozenset())
    return sorted(set(given) - allowed)
# Keys whose values include "none" (lm-eval's CLI hands those over as None).
_NONE_KEYS = ("roles", "rotation", "tensor_scale")
# Keys that only act on linear layers (ignored when roles=none).
_LINEAR_KEYS = ("w_format", "role_formats", "layer_formats", "include", "exclude", "weight_only", "packed",
                "packed_gemm")


def load_recipe(path: Any) -> dict[str, Any]:
    """The MX keys a recipe file holds (``{"model_args": {...}}``, as ``lm-eval-mx search`` writes)."""
    if path is None or not str(path).strip():
        raise ValueError(f"recipe={'None' if path is None else repr(str(path))} names no file; give the path of a "
                         "recipe JSON file (lm-eval-mx search writes one) or leave the key out")
    p = Path(str(path))
    if p.is_dir():
        raise ValueError(f"recipe: {str(p)!r} is a directory; give the path of a recipe JSON file")
    data = read_json(p, "recipe")
    args = data.get("model_args") if isinstance(data, dict) else None
    if not isinstance(args, dict) or not args:
        raise ValueError(f"recipe: {str(p)!r} has no 'model_args' object (a recipe written by lm-eval-mx search has one)")
    unknown = [k for k in args if k not in MX_KEYS or k == "recipe"]
    if unknown:
        raise ValueError(f"recipe: {str(p)!r} holds keys that are not MX keys: {', '.join(unknown)}")
    null = [k for k, v in args.items() if v is None]
    if null:  # JSON null is no value: roles=null would silently make a baseline
        raise ValueError(f"recipe: {str(p)!r} sets {', '.join(null)} to null; write the value (e.g. \"none\" for "
                         "roles) or leave the key out")
    return args


def _normalised(key: str, value: Any) -> Any:
    """A value as MXConfig would read it (so ``fp4`` equals ``fp4_e2m1`` and ``"True"`` equals True); the raw
    value where it does not parse (the parser reports that later)."""
    try:
        if key in ("w_format", "a_format", "format", "bmm_format"):
            return check_format_name(str(value))
        if key in ("weight_only", "attn_bmm", "packed", *_PRESETS):
            return _as_bool(key, value)
        if key in ("block_size", "scale_bits", "rotation_block", "rotation_seed"):
            return _as_int(key, value)
        if key in ("roles", "rotation_roles"):
            return expand_roles("none" if value is None else value, key, extra=(BMM_ROLE,))
        if key == "layer_formats":
            return _parse_rules(key, value)
        if key == "role_formats":
            return parse_mx_args({"roles": list(ROLES), key: value})[0].role_formats
        if key in ("include", "exclude"):
            return _as_pattern(key, value)
        return str(value).strip().lower()
    except ValueError:
        return value


def parse_mx_args(args: dict[str, Any]) -> tuple[MXConfig, dict[str, Any]]:
    """Split user arguments into an ``MXConfig`` and the rest (for the HF model).

    Values may be Python objects or lm-eval CLI strings (``True``, ``32``,
    lists as ``a|b``, dicts as ``role:fmt|role:fmt``). Every MX key given is either
    used or refused with the reason: none is dropped.
    """
    args = dict(args)
    if "recipe" in args:
        recipe = load_recipe(args.pop("recipe"))
        clash = [k for k, v in recipe.items() if k in args and _normalised(k, args[k]) != _normalised(k, v)]
        if clash:
            raise ValueError(f"recipe sets {', '.join(clash)} too; give each key once (in the recipe or model_args)")
        changes = [k for k in args if k in MX_KEYS and k not in recipe and k not in _BESIDE_RECIPE]
        if changes:
            raise ValueError(f"{', '.join(changes)} would change the numerics the recipe was measured with; edit the "
                             f"recipe file instead (beside recipe=, model_args may add: {', '.join(_BESIDE_RECIPE)})")
        args = {**recipe, **args}
    rest = {k: v for k, v in args.items() if k not in MX_KEYS}
    mx = {k: v for k, v in args.items() if k in MX_KEYS}
    user = frozenset(mx)
    for k, v in mx.items():
        if v is None and k in _NONE_KEYS:  # lm-eval's CLI reads the word none as Python None
            mx[k] = "none"
        elif v is None:
            raise ValueError(f"{k}=None: lm-eval's --model_args turns the word none into Python None, and {k} takes "
                             "no such value; give a value or leave the key out")
        elif (isinstance(v, str) and not v.strip()) or (isinstance(v, (list, tuple, dict)) and not v):
            raise ValueError(f"{k} is empty; give a value or leave the key out")
    if "profile" in mx:
        mx = with_profile(mx, _normalised, lambda given: parse_mx_args({k: given[k] for k in
                                                                     ("roles", *_PRESETS) if k in given})[0].roles)
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
        if not _as_list(mx["roles"]):
            raise ValueError(f"roles={mx['roles']!r} names no role; valid: {', '.join(ROLES)}, groups "
                             f"{', '.join(ROLE_GROUPS)} (roles=none switches linear layers off)")
        kw["roles"] = expand_roles(mx["roles"])
    elif "include" in mx:
        kw["roles"] = ROLES  # a pattern alone selects whatever it matches

    if "format" in mx:
        if "w_format" in mx or "a_format" in mx:
            raise ValueError("format= sets both w_format and a_format; do not combine them")
        kw["w_format"] = kw["a_format"] = str(mx["format"])
    for key in ("w_format", "a_format", "rounding", "scale_mode", "scale_format", "tensor_scale", "mx_backend",
                "packed_gemm", "rotation", "bmm_format", "e4m3_steps", "profile"):
        if key in mx:
            kw[key] = str(mx[key])
            if key in ("mx_backend", "packed_gemm"):
                kw[key] = kw[key].strip().lower()
    for key in ("include", "exclude"):
        if key in mx:
            kw[key] = _as_pattern(key, mx[key])
    for key in ("block_size", "scale_bits", "rotation_block", "rotation_seed"):
        if key in mx:
            kw[key] = _as_int(key, mx[key])
    for key in ("weight_only", "attn_bmm", "packed"):
        if key in mx:
            kw[key] = _as_bool(key, mx[key])
    if "rotation_roles" in mx:
        kw["rotation_roles"] = tuple(_as_list(mx["rotation_roles"]))
    if "layer_formats" in mx:
        kw["layer_formats"] = _parse_rules("layer_formats", mx["layer_formats"])
    if "role_formats" in mx:
        value = mx["role_formats"]
        if isinstance(value, (list, tuple)) and all(isinstance(v, (list, tuple)) for v in value):
            if any(len(v) != 2 for v in value):
                raise ValueError(f"role_formats: each pair is (role, format), got {value!r}")
            value = [tuple(v) for v in value]  # (role, format) pairs, as documented
        elif not isinstance(value, dict):
            pairs = [item.split(":", 1) for item in _as_list(value)]
            if any(len(p) != 2 for p in pairs):
                raise ValueError(f"role_formats must look like 'mlp:fp4_e2m1|attn:fp8_e4m3', got {value!r}")
            value = [(k.strip(), v.strip()) for k, v in pairs]  # pairs: MXConfig refuses a role named twice
        kw["role_formats"] = value
    named = {k: tuple(i.lower() for i in _as_list(mx[k])) for k in ("roles", "rotation_roles") if k in mx}
    if presets:
        named["roles"] = (_PRESETS[presets[0]],)
    config = MXConfig(**kw, given=user, named=named)
    _check_given(config, mx)
    return config, rest


def parse_mx_only(spec: dict[str, Any], source: str, allowed: tuple[str, ...] = MX_KEYS) -> MXConfig:
    """An MXConfig from MX keys alone (a command's ``--config``); errors name ``source``."""
    try:
        config, rest = parse_mx_args(spec)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    if rest:
        raise ValueError(f"{source}: MX keys only ({', '.join(allowed)}); got {', '.join(rest)}")
    return config


def _check_given(config: MXConfig, mx: dict[str, Any]) -> None:
    """Keys the user gave that this configuration would not use: refused, with the reason."""
    bmm_reads_a = config.attn_bmm and config.bmm_format is None  # the attention matmuls take a_format
    if "packed_gemm" in mx and not config.packed:
        raise ValueError("packed_gemm chooses how packed weights are multiplied: it needs packed=True")
    if config.weight_only and "a_format" in mx and not bmm_reads_a:
        raise ValueError("a_format would be ignored: weight_only=True keeps layer inputs in high precision "
                         "(a_format is used with weight_only only by attn_bmm=True without bmm_format)")
    if not config.selects_layers:
        linear = [k for k in (*_LINEAR_KEYS, "format") if k in mx and not (k == "format" and bmm_reads_a)]
        if config.attn_bmm and not bmm_reads_a and "a_format" in mx:
            linear.append("a_format")
        if not config.attn_bmm:
            linear += [k for k in ("a_format", *SCHEME_KEYS, "mx_backend") if k in mx]
        if linear:
            raise ValueError(f"{', '.join(linear)} would be ignored: roles=none puts no linear layer in MX"
                             + ("" if config.attn_bmm else " (and attn_bmm is off)"))


__all__ = ["BACKENDS", "BESIDE_CHECKPOINT", "BMM_ROLE", "FIXED_KEYS", "FORMATS", "MX_KEYS", "PACKED_GEMMS", "ROLES", "ROLE_GROUPS",
           "ROTATIONS", "RUN_KEYS", "SCHEME_KEYS", "MXConfig", "check_fixed_keys", "expand_roles", "load_recipe",
           "parse_mx_args", "parse_mx_only", "read_json", "refused_beside_checkpoint"]

"""``profile=NAME``: a stack's numerics (:mod:`lm_eval_mx.numerics.profiles`) turned into MX keys, checked
against the keys the user gave beside it.

Plain Python (no torch): conflicts fail before any model load.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..numerics.profiles import Profile, get_profile
from .values import SCHEME_KEYS

# Keys that would change which layers a profile quantizes or how: a profile is the whole of a stack's numerics.
_NOT_WITH_PROFILE = ("recipe", "role_formats", "layer_formats", "include", "exclude", "rotation", "rotation_block",
                     "rotation_seed", "rotation_roles", "attn_bmm", "bmm_format")
# Keys shaping the numbers of a format: a profile sets those it needs; any other given beside it is refused.
NUMERIC_KEYS = (*SCHEME_KEYS, "e4m3_steps", "weight_only")
_ROLE_KEYS = ("roles", "mlp_only", "attn_only")


def formats_given(mx: dict[str, Any]) -> tuple[str | None, str | None]:
    """(weight format, activation format) the user named (``format`` sets both)."""
    if "format" in mx:
        return str(mx["format"]), str(mx["format"])
    return (str(mx["w_format"]) if "w_format" in mx else None, str(mx["a_format"]) if "a_format" in mx else None)


def with_profile(mx: dict[str, Any], normalised: Callable[[str, Any], Any],
                 roles_of: Callable[[dict[str, Any]], tuple[str, ...]]) -> dict[str, Any]:
    """``mx`` with the keys its ``profile`` sets for the format given; ``ValueError`` naming the profile and the key
    for a key that conflicts with it, or none when no format is given (a shipped checkpoint's reader resolves the
    profile then: :func:`checkpoint_activations`). ``normalised``/``roles_of``: the parser's own readers."""
    profile = get_profile(mx["profile"])
    stray = [k for k in _NOT_WITH_PROFILE if k in mx]
    if stray:
        raise ValueError(f"profile={profile.name} reproduces {profile.stack} as a whole; {', '.join(stray)} would change "
                         "which layers it quantizes or how: drop the profile or the key")
    w, a = formats_given(mx)
    if w is None or (a is None and "format" not in mx and not _as_true(mx.get("weight_only"))):
        if any(k in mx for k in ("w_format", "a_format")):
            raise ValueError(f"profile={profile.name}: give format= (or both w_format and a_format)")
        return mx  # a checkpoint's format, or a missing one (refused where the model loads)
    rule = profile.rule(w, a)
    for key, value in rule.keys.items():
        if key == "roles":
            mine = normalised("roles", value)
            given = roles_of(mx) if any(k in mx for k in _ROLE_KEYS) else None
            if given is not None and set(given) != set(mine):
                shown = ", ".join(f"{k}={mx[k]}" for k in _ROLE_KEYS if k in mx)
                raise ValueError(f"profile={profile.name} quantizes roles={value} ({profile.layers}); {shown} was "
                                 "given: drop one")
        elif key in mx and normalised(key, mx[key]) != normalised(key, value):
            raise ValueError(f"profile={profile.name} sets {key}={value} for {_pair(w, a)} ({profile.stack}); "
                             f"{key}={mx[key]} was given: drop one")
    extra = [k for k in NUMERIC_KEYS if k in mx and k not in rule.keys]
    if extra:
        raise ValueError(f"profile={profile.name} fixes the numerics of {_pair(w, a)} ({profile.stack}); "
                         f"{', '.join(f'{k}={mx[k]}' for k in extra)} would change them: drop the profile or the key")
    out = {k: v for k, v in mx.items() if k not in _ROLE_KEYS or "roles" not in rule.keys}
    return {**out, **rule.keys}


def _as_true(value: Any) -> bool:
    return value is True or str(value).strip().lower() == "true"


def _pair(w: str, a: str | None) -> str:
    return w if a is None or a == w else f"w_format={w}, a_format={a}"


def checkpoint_activations(profile_name: str, layout: str, activations: str | None) -> tuple[Profile, bool]:
    """(profile, whether the stack drops the checkpoint's activation quantization) for a shipped checkpoint of
    ``layout`` whose recipe states ``activations`` (``static``, ``dynamic`` or None); ``ValueError`` with the
    stack's reason where it refuses the checkpoint."""
    profile = get_profile(profile_name)
    return profile, profile.checkpoint(layout, activations) == "weight_only"

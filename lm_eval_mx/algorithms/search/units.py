"""What a search chooses between: candidate formats, units (a layer or a transformer block) and their bits.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from ...numerics.formats import HIGH_PRECISION, check_format_name
from ...selection.config import MX_KEYS, MXConfig, parse_mx_only

if TYPE_CHECKING:
    pass


HP = "bf16"  # the candidate name for "keep the layer in high precision"


HP_BITS = 16  # what a high-precision weight counts, as in MXReport.avg_bits


GRANULARITIES = ("layer", "block")


_REFUSED = {
    "format": "the search decides the formats of the selected layers (give them with --candidates)",
    "w_format": "the search decides the formats of the selected layers (give them with --candidates)",
    "a_format": "the search decides the formats of the selected layers (give them with --candidates)",
    "role_formats": "the search decides the formats of the selected layers (give them with --candidates)",
    "layer_formats": "the search writes layer_formats itself",
    "recipe": "--config gives the selection of a new search; re-solve an existing recipe with --from",
    "packed": "the search swaps formats on one high-precision copy; packed=True keeps only MX codes",
    "packed_gemm": "the search swaps formats on one high-precision copy; packed=True keeps only MX codes",
    "attn_bmm": "the search chooses formats of linear layers; evaluate MX attention matmuls separately",
    "bmm_format": "the search chooses formats of linear layers; evaluate MX attention matmuls separately",
}


class SearchError(ValueError):
    """A search input or budget that cannot be honoured (the message names it and what is allowed)."""


def parse_candidates(value: str | Iterable[str]) -> tuple[str, ...]:
    """Canonical candidate format names (``bf16``/``none``: high precision, written ``bf16``)."""
    items = [v.strip() for v in re.split(r"[,|]", value)] if isinstance(value, str) else [str(v) for v in value]
    items = [v for v in items if v]
    out: list[str] = []
    for item in items:
        try:
            name = check_format_name(item, allow_high_precision=True)
        except ValueError as e:
            raise SearchError(f"--candidates: {e}") from None
        name = HP if name in HIGH_PRECISION else name
        if name in out:
            raise SearchError(f"--candidates names {name} twice ({item!r}); give each format once")
        out.append(name)
    if len(out) < 2 or all(c == HP for c in out):
        raise SearchError(f"--candidates needs at least two formats, one of them MX (e.g. fp4_e2m1,fp8_e4m3,bf16); "
                          f"got {','.join(out) or 'none'}")
    return tuple(out)


def search_config(args: dict[str, Any]) -> MXConfig:
    """The MX configuration of ``--config`` (the selection and numerics keys); format keys are refused."""
    for key in args:
        if key in _REFUSED:
            raise SearchError(f"--config {key}: {_REFUSED[key]}")
    try:
        config = parse_mx_only(args, "--config", tuple(k for k in MX_KEYS if k not in _REFUSED))
    except ValueError as e:
        raise SearchError(str(e)) from None
    if not config.selects_layers:
        raise SearchError("--config selects no linear layer (roles=none): the search needs layers to decide")
    return config


E8M0_KEYS = ("scale_mode", "scale_bits")  # shape E8M0 (MX) block scales only


def e8m0_keys_unused_by(config: MXConfig, fmt: str) -> list[str]:
    """The ``--config`` keys among :data:`E8M0_KEYS` that candidate ``fmt`` leaves unused (it has E4M3 scales,
    as nvfp4): they shape the MX candidates' scales and are dropped for this one."""
    given = [k for k in E8M0_KEYS if getattr(config, k) is not None]
    return given if given and fmt != HP and not config.scheme(fmt).is_mx else []


def candidate_configs(config: MXConfig, candidates: Iterable[str]) -> dict[str, MXConfig]:
    """``config`` with weights and activations in each MX candidate (validated now: e.g. nvfp4 with
    another block_size is refused before any model load). ``scale_mode``/``scale_bits`` apply to the
    candidates with E8M0 scales; they are refused only when no candidate has such scales."""
    out = {}
    for fmt in candidates:
        if fmt == HP:
            continue
        try:
            unused = e8m0_keys_unused_by(config, fmt)
            out[fmt] = dataclasses.replace(config, w_format=fmt, a_format=fmt, **dict.fromkeys(unused))
        except ValueError as e:
            raise SearchError(f"--candidates {fmt} with --config {config.label()}: {e}") from None
    given = [k for k in E8M0_KEYS if getattr(config, k) is not None]
    if given and all(e8m0_keys_unused_by(config, f) for f in out):
        raise SearchError(f"--config {', '.join(given)} shapes E8M0 (MX) block scales, but no candidate "
                          f"({', '.join(out)}) has them: it would be ignored; drop it or add an MX candidate")
    return out


def _exact(bits: float) -> Fraction:
    """Storage bits as an exact fraction (block scales give 1/4, 1/2, or 1/row with block_size=0)."""
    return Fraction(bits).limit_denominator(1 << 24)


def format_bits(config: MXConfig, fmt: str, row: int | None = None) -> Fraction:
    """Bits per weight of a candidate, block scales included (``row`` is needed with block_size=0)."""
    return Fraction(HP_BITS) if fmt == HP else _exact(config.scheme(fmt).bits(row))


@dataclass(frozen=True)
class Unit:
    """What gets one format: a transformer block or one layer, with its layers and weight count."""

    name: str
    layers: tuple[str, ...]
    params: int
    bits: dict[str, Fraction]  # total storage bits per candidate format

    @property
    def pattern(self) -> str:
        """Anchored regex of a ``layer_formats`` rule: the block's prefix, or the exact layer name."""
        if self.layers == (self.name,):
            return "^" + re.escape(self.name) + "$"
        return "^" + re.escape(self.name) + r"\."

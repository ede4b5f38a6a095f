"""``MXReport``: what a configuration replaced, per role and per format, as a table and as JSON.
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .config import ROLES


@dataclass
class LayerEntry:
    name: str
    role: str
    kind: str
    w_format: str
    a_format: str | None
    params: int
    rotation: str | None = None
    w_bits: float | None = None  # storage bits per weight, block scales included


@dataclass
class MXReport:
    """What ``apply_mx`` did: replaced layers, skipped candidates and why, coverage."""

    config: dict[str, Any]
    replaced: list[LayerEntry] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # name, role, reason
    notes: list[str] = field(default_factory=list)
    total_linear_params: int = 0
    attn_bmm: str | None = None  # format of the attention matmuls, when they are in MX
    packed_bytes: int | None = None  # packed=True: bytes of the replaced layers' codes + scales...
    dense_bytes: int | None = None  # ...and of the same weights in the dtype they were loaded in

    @property
    def replaced_params(self) -> int:
        return sum(e.params for e in self.replaced)

    def avg_bits(self, high_precision_bits: float = 16.0) -> float | None:
        """Storage bits per weight over every selectable linear weight: replaced ones at their scheme's
        bits (scales included), the rest at ``high_precision_bits``; None without linear weights."""
        if not self.total_linear_params:
            return None
        rest = self.total_linear_params - self.replaced_params
        total = sum(e.params * (e.w_bits or high_precision_bits) for e in self.replaced) + rest * high_precision_bits
        return round(total / self.total_linear_params, 4)

    def summary(self) -> dict[str, Any]:
        """Compact form for results files."""
        per_role = Counter(e.role for e in self.replaced)
        per_fmt = Counter(f"w={e.w_format},a={e.a_format or '-'}" for e in self.replaced)
        return {
            "replaced_layers": len(self.replaced),
            "replaced_params": self.replaced_params,
            "linear_params": self.total_linear_params,
            "coverage_pct": round(100 * self.replaced_params / self.total_linear_params, 3) if self.total_linear_params else 0.0,
            "layers_per_role": dict(sorted(per_role.items())),
            "layers_per_format": dict(sorted(per_fmt.items())),
            "layers_per_rotation": dict(Counter(e.rotation for e in self.replaced if e.rotation)),
            "avg_weight_bits": self.avg_bits(),
            "skipped_per_reason": dict(Counter(r for _, _, r in self.skipped)),
            "attn_bmm": self.attn_bmm,
            "packed_weight_bytes": self.packed_bytes,
            "dense_weight_bytes": self.dense_bytes,
            "packed_ratio": round(self.packed_bytes / self.dense_bytes, 4) if self.packed_bytes and self.dense_bytes else None,
            "notes": list(self.notes),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "summary": self.summary(),
            "replaced": [vars(e) for e in self.replaced],
            "skipped": [{"name": n, "role": r, "reason": why} for n, r, why in self.skipped],
        }

    def table(self) -> str:
        """A readable per-role table (rendered with rich)."""
        from rich.console import Console
        from rich.table import Table

        t = Table(title="MX replacement report", show_lines=False)
        for col in ("role", "replaced", "skipped", "formats (w/a)", "params in MX"):
            t.add_column(col, justify="right" if col in ("replaced", "skipped", "params in MX") else "left")
        for role in ROLES:
            rep = [e for e in self.replaced if e.role == role]
            skp = [s for s in self.skipped if s[1] == role]
            if not rep and not skp:
                continue
            fmts = sorted({f"{e.w_format}/{e.a_format or '-'}" + (f" {e.rotation}" if e.rotation else "") for e in rep})
            t.add_row(role, str(len(rep)), str(len(skp)), ", ".join(fmts) or "-", f"{sum(e.params for e in rep):,}")
        s = self.summary()
        t.caption = (
            f"{s['replaced_layers']} layers, {s['replaced_params']:,} of {s['linear_params']:,} "
            f"linear weights ({s['coverage_pct']:.1f}%) in MX"
            + (f"; attention matmuls in {self.attn_bmm}" if self.attn_bmm else "")
        )
        console = Console(width=110, record=True, file=io.StringIO())
        console.print(t)
        if self.packed_bytes and self.dense_bytes:
            console.print(f"stored packed: {_size(self.packed_bytes)} of MX codes + scales instead of "
                          f"{_size(self.dense_bytes)} ({s['packed_ratio']:.3f}x)")
        for note in self.notes:
            console.print(f"note: {note}")
        return console.export_text()


def _size(n: float) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:,.1f} {units[i]}"

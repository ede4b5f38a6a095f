"""Compare's table: lm-eval results (files or runs) to rows of baseline, MX value and delta, written as
markdown, CSV, JSON, a rich table and a PNG.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Run:
    """One evaluated configuration: its label, MX config (None for the baseline) and lm-eval results."""

    label: str
    config: dict[str, Any] | None
    results: dict[str, Any]

    @property
    def nonfinite(self) -> dict[str, int] | None:
        """Requests per task that hf-mx scored non-finite (``mx_nonfinite_requests``); None if not recorded."""
        counts = (self.results.get("config") or {}).get("mx_nonfinite_requests")
        return None if counts is None else {str(t): int(n) for t, n in counts.items()}


@dataclass
class Row:
    """One (task, metric): the baseline and every MX run. A value is None where the run lacks the metric
    and NaN/inf where lm-eval reported it non-finite; the ``*nonfinite`` counts are that run's
    non-finite requests for the task (None: not recorded)."""

    task: str
    metric: str
    baseline: float | None
    baseline_stderr: float | None
    values: list[float | None] = field(default_factory=list)
    stderrs: list[float | None] = field(default_factory=list)
    baseline_nonfinite: int | None = None
    nonfinite: list[int | None] = field(default_factory=list)

    def delta(self, i: int) -> float | None:
        v = self.values[i]
        return None if v is None or self.baseline is None else v - self.baseline

    def significant(self, i: int) -> bool | None:
        """|Δ| beyond the combined standard error sqrt(se_b² + se_mx²); None when unknown."""
        d, se, se_b = self.delta(i), self.stderrs[i], self.baseline_stderr
        if d is None or se is None or se_b is None or not all(map(math.isfinite, (d, se, se_b))):
            return None
        return abs(d) > math.sqrt(se_b**2 + se**2)

    def baseline_flagged(self) -> bool:
        """The baseline value is NaN/inf, or the baseline run scored requests of this task non-finite."""
        return _flagged(self.baseline, self.baseline_nonfinite)

    def flagged(self, i: int) -> bool:
        """As :meth:`baseline_flagged`, for MX run ``i`` (a finite accuracy over NaN scores means nothing)."""
        return _flagged(self.values[i], self.nonfinite[i])

    def delta_flagged(self, i: int) -> bool:
        return self.flagged(i) or self.baseline_flagged()


def _flagged(value: float | None, nonfinite: int | None) -> bool:
    return (value is not None and not math.isfinite(value)) or bool(nonfinite)


def _num(v: Any) -> float | None:
    """A number from a results file, non-finite ones kept (they must show); None for anything else ("N/A")."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def metrics_of(results: dict[str, Any]) -> dict[tuple[str, str], tuple[float, float | None]]:
    """{(task, metric): (value, stderr)} from an lm-eval results dict (``results['results']``)."""
    out: dict[tuple[str, str], tuple[float, float | None]] = {}
    for task, entries in results.get("results", {}).items():
        for key, value in entries.items():
            if "," not in key or "_stderr" in key:
                continue
            metric, filt = key.split(",", 1)
            v = _num(value)
            if v is None:
                continue
            name = metric if filt == "none" else f"{metric} ({filt})"
            out[(task, name)] = (v, _num(entries.get(f"{metric}_stderr,{filt}")))
    return out


def build_rows(baseline: Run, others: list[Run]) -> list[Row]:
    """One row per (task, metric) that any run reports, sorted."""
    base = metrics_of(baseline.results)
    others_m = [metrics_of(r.results) for r in others]
    counts = [r.nonfinite for r in others]
    base_counts = baseline.nonfinite
    rows = []
    for task, metric in sorted(set(base).union(*others_m)):
        value, se = base.get((task, metric), (None, None))
        row = Row(task, metric, value, se, baseline_nonfinite=None if base_counts is None else base_counts.get(task, 0))
        for m, c in zip(others_m, counts):
            v, s = m.get((task, metric), (None, None))
            row.values.append(v)
            row.stderrs.append(s)
            row.nonfinite.append(None if c is None else c.get(task, 0))
        rows.append(row)
    return rows


def _fmt(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "-"
    if math.isnan(v):
        return "NaN"
    return f"{v:+.4f}" if signed else f"{v:.4f}"


def _mark(sig: bool | None) -> str:
    return {True: " *", False: "", None: " ?"}[sig]


def _count(n: int | None) -> str:
    return "-" if n is None else str(n)


def header(labels: list[str]) -> list[str]:
    cols = ["task", "metric", "baseline"]
    for label in labels:
        cols += [label, f"Δ {label}"]
    return cols


NONFINITE_ROW = "non-finite requests"


def table_cells(rows: list[Row]) -> list[list[str]]:
    """Cells of every row; after a task's rows, its non-finite request counts if any run had some."""
    out = []
    for j, r in enumerate(rows):
        flag = " !" if r.baseline_flagged() else ""
        se = f" ±{_fmt(r.baseline_stderr)}" if r.baseline_stderr else ""
        cells = [r.task, r.metric, _fmt(r.baseline) + se + flag]
        for i in range(len(r.values)):
            d = r.delta(i)
            mark = "" if d is None else " !" if r.delta_flagged(i) else _mark(r.significant(i))
            cells += [_fmt(r.values[i]) + (" !" if r.flagged(i) else ""), _fmt(d, signed=True) + mark]
        out.append(cells)
        last_of_task = j + 1 == len(rows) or rows[j + 1].task != r.task
        if last_of_task and (r.baseline_nonfinite or any(r.nonfinite)):
            out.append([r.task, NONFINITE_ROW, _count(r.baseline_nonfinite),
                        *[c for n in r.nonfinite for c in (_count(n), "")]])
    return out


FOOTNOTE = "Δ = MX - baseline; * |Δ| exceeds the combined stderr sqrt(se_base² + se_mx²); ? no stderr reported."


FLAG_NOTE = f"! NaN/inf value, or the run scored requests of this task non-finite (row '{NONFINITE_ROW}'); - absent."


def footnote(rows: list[Row]) -> str:
    """The legend; the '!' line only where something is flagged."""
    flagged = any(r.baseline_flagged() or any(r.flagged(i) for i in range(len(r.values))) for r in rows)
    return FOOTNOTE + ("\n" + FLAG_NOTE if flagged else "")


def to_markdown(rows: list[Row], labels: list[str]) -> str:
    cols = header(labels)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(c) + " |" for c in table_cells(rows)]
    return "\n".join(lines) + f"\n\n{footnote(rows)}\n"


CSV_COLUMNS = ["task", "metric", "config", "value", "stderr", "delta", "baseline", "baseline_stderr", "significant",
               "nonfinite_requests", "flagged"]


def to_csv(rows: list[Row], labels: list[str]) -> str:
    """Long format, one line per (task, metric, config). Empty value: metric absent; nan: not finite."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_COLUMNS)
    for r in rows:
        base_delta = None if r.baseline is None else r.baseline - r.baseline
        w.writerow([r.task, r.metric, "baseline", r.baseline, r.baseline_stderr, base_delta, r.baseline,
                    r.baseline_stderr, "", r.baseline_nonfinite, r.baseline_flagged()])
        for i, label in enumerate(labels):
            w.writerow([r.task, r.metric, label, r.values[i], r.stderrs[i], r.delta(i), r.baseline,
                        r.baseline_stderr, r.significant(i), r.nonfinite[i], r.delta_flagged(i)])
    return buf.getvalue()


def to_json(rows: list[Row], runs: list[Run]) -> dict[str, Any]:
    """Every run's config and non-finite counts, and the rows (NaN written as JSON NaN, absent as null)."""
    labels = [r.label for r in runs[1:]]
    return {
        "baseline": runs[0].label,
        "configs": {r.label: r.config for r in runs[1:]},
        "nonfinite_requests": {r.label: r.nonfinite for r in runs},
        "rows": [
            {"task": r.task, "metric": r.metric, "baseline": r.baseline, "baseline_stderr": r.baseline_stderr,
             "baseline_nonfinite_requests": r.baseline_nonfinite, "baseline_flagged": r.baseline_flagged(),
             "mx": {label: {"value": r.values[i], "stderr": r.stderrs[i], "delta": r.delta(i),
                            "significant": r.significant(i), "nonfinite_requests": r.nonfinite[i],
                            "flagged": r.delta_flagged(i)} for i, label in enumerate(labels)}}
            for r in rows
        ],
    }


def rich_table(rows: list[Row], labels: list[str], title: str = "Baseline vs MX") -> Any:
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=title, caption=footnote(rows))
    for i, col in enumerate(header(labels)):  # labels and task names are text, not markup: "[...]" stays
        t.add_column(escape(col), justify="left" if i < 2 else "right", overflow="fold")
    for cells in table_cells(rows):
        t.add_row(*map(escape, cells))
    return t


def plot(rows: list[Row], labels: list[str], path: Path) -> Path | None:
    """A PNG of Δ per config, one panel per task/metric (own scale), combined-stderr error bars.

    A non-finite Δ is a red cross labelled NaN and an absent one the word "absent", never a bar of
    height 0; a run with non-finite requests for the task says how many under its name.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ncols = min(4, len(rows))
    nrows = math.ceil(len(rows) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.8 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, row in zip(axes.flat, rows):
        bars = [i for i in range(len(labels)) if row.delta(i) is not None and math.isfinite(row.delta(i))]  # type: ignore[arg-type]
        errs = [math.sqrt((row.baseline_stderr or 0) ** 2 + (row.stderrs[i] or 0) ** 2) for i in bars]
        ax.bar(bars, [row.delta(i) for i in bars], yerr=[e if math.isfinite(e) else 0 for e in errs], capsize=3,
               color=[colors[i % len(colors)] for i in bars])
        for i in range(len(labels)):
            d = row.delta(i)
            if d is None:
                ax.annotate("absent", (i, 0), ha="center", va="bottom", fontsize=7, color="gray")
            elif not math.isfinite(d):
                ax.scatter([i], [0], marker="X", s=60, color="red", zorder=3)
                ax.annotate("NaN", (i, 0), xytext=(0, 6), textcoords="offset points", ha="center", fontsize=7,
                            color="red")
        ax.axhline(0, color="black", linewidth=0.8)
        base = "absent" if row.baseline is None else f"{row.baseline:.4g}"
        if row.baseline_nonfinite:
            base += f", {row.baseline_nonfinite} non-finite"
        ax.set_title(f"{row.task}\n{row.metric} (baseline {base})", fontsize=8)
        ticks = [label + (f"\n{n} non-finite" if n else "") for label, n in zip(labels, row.nonfinite)]
        ax.set_xticks(range(len(labels)), ticks, fontsize=7, rotation=20, ha="right")
        ax.set_xlim(-0.6, len(labels) - 0.4)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    fig.suptitle("Δ = MX - baseline per task and metric (error bars: combined stderr; X: not finite)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(runs: list[Run], out_dir: Path) -> dict[str, Path]:
    """compare.md / .csv / .json / .png (and each run's results) in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = [r.label for r in runs[1:]]
    rows = build_rows(runs[0], runs[1:])
    paths = {"markdown": out_dir / "compare.md", "csv": out_dir / "compare.csv", "json": out_dir / "compare.json"}
    paths["markdown"].write_text(to_markdown(rows, labels))
    paths["csv"].write_text(to_csv(rows, labels))
    paths["json"].write_text(json.dumps(to_json(rows, runs), indent=2, default=str))
    png = plot(rows, labels, out_dir / "compare.png")
    if png:
        paths["png"] = png
    return paths


def load_results(path: str | Path) -> Run:
    """One lm-eval results file as a Run; a one-line error naming the file if it is unreadable or not one."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"compare --results: cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"compare --results: {path} is not a JSON file ({e})") from None
    tasks = data.get("results") if isinstance(data, dict) else None
    if not isinstance(tasks, dict) or not tasks or not all(isinstance(v, dict) for v in tasks.values()):
        raise ValueError(f"compare --results: {path} is not an lm-eval results file (no 'results' object of tasks, "
                         "as lm-eval's --output_path writes)")
    if not metrics_of(data):
        raise ValueError(f"compare --results: {path} holds no numeric metric")
    cfg = data.get("config", {}) or {}
    mx = cfg.get("mx_config")
    report = cfg.get("mx_report") or {}
    in_mx = bool(report.get("replaced_layers") or report.get("attn_bmm"))
    if mx is not None and not in_mx:
        return Run("baseline", None, data)  # an hf-mx run with nothing in MX
    return Run(cfg.get("mx_label") if in_mx else path.stem, mx if in_mx else None, data)


def unique_labels(labels: list[str], details: list[str]) -> list[str]:
    """``label [detail]`` wherever labels coincide, so that no run overwrites another in the outputs.

    (A label names only what differs from the defaults, so distinct configurations can share one.)
    """
    out = [f"{label} [{d}]" if labels.count(label) > 1 else label for label, d in zip(labels, details)]
    return out if len(set(out)) == len(out) else [f"{label} #{i}" for i, label in enumerate(out)]

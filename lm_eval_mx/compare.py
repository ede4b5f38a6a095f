"""Baseline vs MX: run (or read) lm-eval results and tabulate the deltas.

The model is loaded once; MX is applied, evaluated and removed per configuration
on the same copy (``HFMXLM.set_mx``), so every run sees identical weights,
batches and seeds.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import MXConfig, parse_mx_args


@dataclass
class Run:
    """One evaluated configuration: its label, MX config (None for the baseline) and lm-eval results."""

    label: str
    config: dict[str, Any] | None
    results: dict[str, Any]


@dataclass
class Row:
    task: str
    metric: str
    baseline: float
    baseline_stderr: float | None
    values: list[float | None] = field(default_factory=list)
    stderrs: list[float | None] = field(default_factory=list)

    def delta(self, i: int) -> float | None:
        v = self.values[i]
        return None if v is None else v - self.baseline

    def significant(self, i: int) -> bool | None:
        """|Δ| beyond the combined standard error sqrt(se_b² + se_mx²); None when unknown."""
        d, se = self.delta(i), self.stderrs[i]
        if d is None or se is None or self.baseline_stderr is None:
            return None
        return abs(d) > math.sqrt(self.baseline_stderr**2 + se**2)


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


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
    base = metrics_of(baseline.results)
    others_m = [metrics_of(r.results) for r in others]
    rows = []
    for (task, metric), (value, se) in sorted(base.items()):
        row = Row(task, metric, value, se)
        for m in others_m:
            v, s = m.get((task, metric), (None, None))
            row.values.append(v)
            row.stderrs.append(s)
        rows.append(row)
    return rows


def _fmt(v: float | None, signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.4f}" if signed else f"{v:.4f}"


def _mark(sig: bool | None) -> str:
    return {True: " *", False: "", None: " ?"}[sig]


def header(labels: list[str]) -> list[str]:
    cols = ["task", "metric", "baseline"]
    for label in labels:
        cols += [label, f"Δ {label}"]
    return cols


def table_cells(rows: list[Row]) -> list[list[str]]:
    out = []
    for r in rows:
        cells = [r.task, r.metric, _fmt(r.baseline) + (f" ±{r.baseline_stderr:.4f}" if r.baseline_stderr else "")]
        for i in range(len(r.values)):
            cells += [_fmt(r.values[i]), _fmt(r.delta(i), signed=True) + _mark(r.significant(i))]
        out.append(cells)
    return out


FOOTNOTE = "Δ = MX - baseline; * |Δ| exceeds the combined stderr sqrt(se_base² + se_mx²); ? no stderr reported."


def to_markdown(rows: list[Row], labels: list[str]) -> str:
    cols = header(labels)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(c) + " |" for c in table_cells(rows)]
    return "\n".join(lines) + f"\n\n{FOOTNOTE}\n"


def to_csv(rows: list[Row], labels: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["task", "metric", "config", "value", "stderr", "delta", "baseline", "baseline_stderr", "significant"])
    for r in rows:
        w.writerow([r.task, r.metric, "baseline", r.baseline, r.baseline_stderr, 0.0, r.baseline, r.baseline_stderr, ""])
        for i, label in enumerate(labels):
            w.writerow([r.task, r.metric, label, r.values[i], r.stderrs[i], r.delta(i), r.baseline,
                        r.baseline_stderr, r.significant(i)])
    return buf.getvalue()


def to_json(rows: list[Row], runs: list[Run]) -> dict[str, Any]:
    labels = [r.label for r in runs[1:]]
    return {
        "baseline": runs[0].label,
        "configs": {r.label: r.config for r in runs[1:]},
        "rows": [
            {"task": r.task, "metric": r.metric, "baseline": r.baseline, "baseline_stderr": r.baseline_stderr,
             "mx": {label: {"value": r.values[i], "stderr": r.stderrs[i], "delta": r.delta(i),
                            "significant": r.significant(i)} for i, label in enumerate(labels)}}
            for r in rows
        ],
    }


def rich_table(rows: list[Row], labels: list[str], title: str = "Baseline vs MX") -> Any:
    from rich.table import Table

    t = Table(title=title, caption=FOOTNOTE)
    for i, col in enumerate(header(labels)):
        t.add_column(col, justify="left" if i < 2 else "right", overflow="fold")
    for cells in table_cells(rows):
        t.add_row(*cells)
    return t


def plot(rows: list[Row], labels: list[str], path: Path) -> Path | None:
    """A PNG of Δ per config, one panel per task/metric (own scale), combined-stderr error bars."""
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
        ds = [row.delta(i) or 0.0 for i in range(len(labels))]
        errs = [math.sqrt((row.baseline_stderr or 0) ** 2 + (row.stderrs[i] or 0) ** 2) for i in range(len(labels))]
        ax.bar(range(len(labels)), ds, yerr=errs, capsize=3, color=[colors[i % len(colors)] for i in range(len(labels))])
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_title(f"{row.task}\n{row.metric} (baseline {row.baseline:.4g})", fontsize=8)
        ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=20, ha="right")
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    fig.suptitle("Δ = MX - baseline per task and metric (error bars: combined stderr)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def expand_sweep(spec: str) -> list[dict[str, str]]:
    """``"format=fp8,fp4 block_size=32,16 roles=mlp,all"`` -> the 8 combinations, as model_args dicts.

    Keys are separated by spaces or ';', alternatives by ','; a value that is
    itself a list uses '|' (``roles=mlp_up|mlp_down,all``).
    """
    axes: list[tuple[str, list[str]]] = []
    for part in spec.replace(";", " ").split():
        key, sep, values = part.partition("=")
        alts = [v for v in values.split(",") if v]
        if not sep or not key or not alts:
            raise ValueError(f"sweep: expected key=v1,v2,... but got {part!r}")
        axes.append((key, alts))
    if not axes:
        raise ValueError("sweep: empty specification")
    combos = [dict(zip([k for k, _ in axes], values)) for values in itertools.product(*(v for _, v in axes))]
    for c in combos:
        parse_mx_args(c)  # validate every point of the grid before any run
    return combos


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
    data = json.loads(Path(path).read_text())
    cfg = data.get("config", {}) or {}
    mx = cfg.get("mx_config")
    report = cfg.get("mx_report") or {}
    in_mx = bool(report.get("replaced_layers") or report.get("attn_bmm"))
    if mx is not None and not in_mx:
        return Run("baseline", None, data)  # an hf-mx run with nothing in MX
    return Run(cfg.get("mx_label") if in_mx else Path(path).stem, mx if in_mx else None, data)


def run_configs(
    base_args: dict[str, Any],
    configs: list[tuple[str, MXConfig]],
    tasks: list[str],
    *,
    limit: float | None = None,
    num_fewshot: int | None = None,
    batch_size: int | str = 1,
    device: str | None = None,
    seed: int = 1234,
    include_path: str | None = None,
    progress: bool = True,
) -> list[Run]:
    """Evaluate the baseline then each MX configuration on one model copy."""
    packed = [label for label, cfg in configs if cfg.packed]
    if packed or base_args.get("packed") not in (None, False, "False", "false"):
        raise ValueError(
            "compare evaluates every configuration on one high-precision copy, but packed=True loads a model "
            "per configuration: run `lm-eval-mx run --model hf-mx --model_args ...,packed=True` for each "
            "(and the baseline), then `lm-eval-mx compare --results BASELINE.json MX.json ...`"
        )
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from .model import HFMXLM

    args = {**base_args, "batch_size": batch_size, "roles": "none", "mx_keep_original": True}
    if device is not None:
        args["device"] = device
    lm = HFMXLM(**args)
    task_manager = TaskManager(include_path=include_path)
    plan = [("baseline", MXConfig(roles=())), *configs]
    runs: list[Run] = []
    from rich.progress import Progress

    with Progress(disable=not progress or lm.rank != 0) as bar:
        job = bar.add_task("configurations", total=len(plan))
        for label, cfg in plan:
            bar.update(job, description=f"evaluating {label}")
            lm.set_mx(cfg)
            res = simple_evaluate(
                model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=task_manager,
                random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                bootstrap_iters=1000,
            )
            if res is not None:  # None on non-zero ranks under accelerate
                runs.append(Run(label, cfg.to_dict() if cfg.enabled else None, res))
            bar.advance(job)
    lm.set_mx(MXConfig(roles=()))
    return runs

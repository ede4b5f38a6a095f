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
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import MX_KEYS, MXConfig, _as_bool, parse_mx_args, suggest


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
        if key in dict(axes):  # a dict of the grid would keep only the last
            raise ValueError(f"sweep: key {key!r} given twice in {spec!r}; list its values once: {key}=v1,v2")
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


def parse_kv(text: str, what: str) -> dict[str, Any]:
    """lm-eval's ``key=value,...`` (values typed as lm-eval types them), refusing an item without '=' and a key
    given twice (lm-eval would keep the last value silently)."""
    from lm_eval.utils import simple_parse_args_string

    items = [a for a in text.split(",") if a.strip()]
    keys = [a.partition("=")[0].strip() for a in items]
    bad = [a for a, k in zip(items, keys) if "=" not in a or not k]
    if bad:
        raise ValueError(f"{what}: expected key=value, got {bad[0]!r}")
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ValueError(f"{what}: {', '.join(twice)} given twice in {text!r}")
    return simple_parse_args_string(text)


def parse_model_args(text: str, mx_flag: str) -> dict[str, Any]:
    """``--model_args``: the hf model's arguments, with ``pretrained`` and without MX keys (``mx_flag`` takes those)."""
    args = parse_kv(text, "--model_args")
    if "pretrained" not in args:
        raise ValueError("--model_args needs pretrained=<model path or hub id>")
    mx_keys = [k for k in args if k in MX_KEYS]
    if mx_keys:
        raise ValueError(f"put MX keys ({', '.join(mx_keys)}) in {mx_flag}, not --model_args")
    return args


def parse_config(source: str, spec: dict[str, Any]) -> MXConfig:
    """One MX configuration from MX keys only; errors name ``source``, e.g. ``--config 'format=fp8'``."""
    try:
        cfg, rest = parse_mx_args(spec)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    if rest:
        raise ValueError(f"{source}: MX keys only ({', '.join(MX_KEYS)}); got {', '.join(rest)}")
    return cfg


def plan_configs(specs: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, MXConfig]]:
    """(label, MXConfig) per (source, MX args), checked by :func:`check_configs`, with unique labels."""
    parsed = [(source, parse_config(source, spec)) for source, spec in specs]
    check_configs(parsed)
    details = [",".join(f"{k}={v}" for k, v in spec.items()) for _, spec in specs]
    return list(zip(unique_labels([c.label() for _, c in parsed], details), [c for _, c in parsed]))


def check_configs(configs: list[tuple[str, MXConfig]]) -> None:
    """Each (source, config) puts something in MX (the baseline is always run) and none comes twice."""
    for i, (source, cfg) in enumerate(configs):
        if not cfg.enabled:
            raise ValueError(f"{source} puts nothing in MX: that is the baseline, which compare always runs")
        same = next((s for s, c in configs[:i] if c == cfg), None)
        if same is not None:
            raise ValueError(f"{same} and {source} are the same MX configuration ({cfg.label()}): give it once")


def check_run_args(limit: float | None, batch_size: int | str, num_fewshot: int | None = None) -> tuple[float | None, int | str]:
    """(limit, batch_size) as lm-eval takes them, refusing values it would only trip over once the model is loaded."""
    if limit is not None:
        if not math.isfinite(limit) or limit <= 0 or (limit >= 1 and limit != int(limit)):
            raise ValueError(f"--limit must be an integer >= 1 (examples per task) or a fraction in (0, 1), got {limit:g}")
        limit = int(limit) if limit >= 1 else limit
    text = str(batch_size)
    if text.isdigit() and int(text) >= 1:
        batch: int | str = int(text)
    elif re.fullmatch(r"auto(:[1-9][0-9]*)?", text):
        batch = text
    else:
        raise ValueError(f"--batch_size must be an integer >= 1, auto or auto:N, got {text!r}")
    if num_fewshot is not None and num_fewshot < 0:
        raise ValueError(f"--num_fewshot must be >= 0, got {num_fewshot}")
    return limit, batch


def resolve_device(device: str | None, model_args: dict[str, Any] | None = None) -> str:
    """``--device``, else model_args' ``device``, else cuda when available, else cpu.

    lm-eval's HFLM defaults to "cuda" and falls back to the CPU only for a device it does not know,
    so without this a CPU-only machine fails deep in transformers ("Torch not compiled with CUDA enabled").
    """
    import torch

    given = (model_args or {}).get("device")
    if device is not None and given is not None and str(given) != device:
        raise ValueError(f"device given twice: --device {device} and model_args device={given}")
    chosen = device if device is not None else given
    if chosen is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(chosen).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {chosen}: CUDA is not available here; use cpu, or leave --device out")
    return str(chosen)


def task_manager_for(tasks: list[str], include_path: list[str]) -> Any:
    """lm-eval's TaskManager over ``include_path`` alone when it holds every task (the offline tasks: instant),
    else with lm-eval's own tasks too (indexing their ~13,000 YAML files takes 15 s or more on 2 cores)."""
    from lm_eval.tasks import TaskManager

    local = TaskManager(include_path=include_path, include_defaults=False)
    if all(Path(t).is_file() or local.match_tasks([t]) for t in tasks):
        return local
    return TaskManager(include_path=include_path)


def check_tasks(tasks: list[str], task_manager: Any, flag: str = "--tasks") -> None:
    """Refuse, before the model loads, task names that lm-eval does not know (``flag``: the option that gave them)."""
    if not tasks:
        raise ValueError(f"{flag}: no task given")
    unknown = [t for t in tasks if not Path(t).is_file() and not task_manager.match_tasks([t])]
    if unknown:
        hints = "; ".join(f"{t!r}{suggest(t, task_manager.all_tasks)}" for t in unknown)
        raise ValueError(f"{flag}: unknown task {hints} (`lm-eval-mx ls tasks` lists them)")


def check_against_model_args(base_args: dict[str, Any], configs: list[tuple[str, MXConfig]]) -> None:
    """What each configuration cannot do with these hf arguments on this machine (packed, attn_implementation,
    the backend): ``ValueError`` naming the configuration, before the model loads."""
    from .model import check_hf_args

    if any(cfg.packed for _, cfg in configs) or _as_bool("packed", base_args.get("packed", False)):
        raise ValueError(
            "compare evaluates every configuration on one high-precision copy, but packed=True loads a model "
            "per configuration: run `lm-eval-mx run --model hf-mx --model_args ...,packed=True` for each "
            "(and the baseline), then `lm-eval-mx compare --results BASELINE.json MX.json ...`"
        )
    for label, cfg in configs:
        try:
            check_hf_args(cfg, base_args)
        except ValueError as e:
            raise ValueError(f"configuration {label!r}: {e}") from None


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
    include_path: str | list[str] | None = None,
    task_manager: Any = None,
    progress: bool = True,
) -> list[Run]:
    """Evaluate the baseline then each MX configuration on one model copy; every argument is checked first,
    before the model loads."""
    check_against_model_args(base_args, configs)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from .attention import AttentionError
    from .model import HFMXLM
    from .selection import SelectionError, check_config

    labels = ["baseline", *(label for label, _ in configs)]
    if len(set(labels)) != len(labels):
        raise ValueError(f"configuration labels must be unique and not 'baseline' (compare.json is keyed by them): {labels}")
    check_configs([(f"configuration {label!r}", cfg) for label, cfg in configs])
    limit, batch_size = check_run_args(limit, batch_size, num_fewshot)
    task_manager = task_manager or TaskManager(include_path=include_path)
    check_tasks(tasks, task_manager)
    args = {**base_args, "batch_size": batch_size, "roles": "none", "mx_keep_original": True,
            "device": resolve_device(device, base_args)}
    lm = HFMXLM(**args)
    for label, cfg in configs:  # what a configuration cannot do on this model fails now, not after the baseline's run
        try:
            check_config(lm.model, cfg)
        except (SelectionError, AttentionError) as e:
            raise SelectionError(f"configuration {label!r}: {e}") from None
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

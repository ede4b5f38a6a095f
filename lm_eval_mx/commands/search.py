"""``lm-eval-mx search``: which format each layer (or transformer block) gets, under a bits or KL budget.

Measure each unit's KL in each candidate format (:mod:`lm_eval_mx.algorithms.search.measure`), solve
(:mod:`~lm_eval_mx.algorithms.search.solver`), measure the chosen mix for real and write a recipe
(:mod:`~lm_eval_mx.algorithms.search.recipe`) that ``hf-mx`` reads (``recipe=recipe.json``).
The measurement runs in one process: under ``accelerate launch`` rank 0 measures and writes,
the other ranks exit at once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..algorithms.search.measure import Measurer
from ..algorithms.search.recipe import _cache, build_recipe, read_search, units_from_recipe
from ..algorithms.search.solver import check_budget, mix_bits, solve
from ..algorithms.search.units import (
    GRANULARITIES,
    HP,
    HP_BITS,
    SearchError,
    candidate_configs,
    e8m0_keys_unused_by,
    format_bits,
    parse_candidates,
    search_config,
)
from ..selection.config import MX_KEYS, parse_mx_args

if TYPE_CHECKING:
    pass


DEFAULT_OUTPUT = "recipe.json"


DEFAULT_MAX_TOKENS = 8192


DEFAULT_BATCH_SIZE = 4


DEFAULT_MAX_LENGTH = 256


# --config keys the search decides or cannot honour, with the reason.


# Options fixed by the measurements a recipe caches (--from refuses a new value).
_MEASUREMENT_OPTIONS = ("config", "granularity", "corpus", "max_tokens", "max_length")


# Environment variables that make accelerate/torch.distributed see several processes.
_DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "PMI_RANK",
             "PMI_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
             "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")


def _kl(x: float | None) -> str:
    if x is None:
        return "not measured"
    return "NaN" if math.isnan(x) else f"{x:.5f}"


def _pct(x: float | None) -> str:
    if x is None:
        return "-"
    return "NaN" if math.isnan(x) else f"{100 * x:.2f}%"


def render(recipe: dict[str, Any]) -> Any:
    """Rich renderables: per-unit table (KL alone per candidate, chosen format), totals, uniform mixes."""
    from rich.console import Group
    from rich.table import Table

    cands = recipe["candidates"]
    mx = [f for f in cands if f != HP]
    t = Table(title=f"KL(baseline ‖ MX) of each {recipe['granularity']} alone, nats/token "
                    f"({recipe['corpus_tokens']} tokens)")
    t.add_column(recipe["granularity"])
    t.add_column("params", justify="right")
    for f in mx:
        t.add_column(f, justify="right")
    t.add_column("chosen")
    for unit, sens in recipe["sensitivities"].items():
        chosen = recipe["assignment"][unit]
        cells = [f"[bold]{_kl(sens[f])}[/bold]" if f == chosen else _kl(sens[f]) for f in mx]
        t.add_row(unit, f"{recipe['params'][unit]:,}", *cells, chosen)
    if HP in cands:
        t.caption = f"{HP}: the unit stays in high precision (KL 0 by construction, {HP_BITS} bits)"
    s = Table(title="Mixes (bits per selected weight, scales included)")
    for col in ("mix", "avg bits", "predicted KL", "measured KL", "top-1 agreement"):
        s.add_column(col, justify="left" if col == "mix" else "right")
    budget = ", ".join(f"{k} {v:g}" for k, v in recipe["budget"].items() if v is not None)
    top1 = recipe["top1_agreement"]
    s.add_row(f"searched ({budget})", f"{recipe['avg_bits']:.4f}", _kl(recipe["predicted_kl"]),
              _kl(recipe["measured_kl"]), _pct(top1))
    for f, row in recipe["uniform"].items():
        s.add_row(f"uniform {f}", f"{row['avg_bits']:.4f}", _kl(row["predicted_kl"]), _kl(row["kl_base_mx"]),
                  _pct(row["top1_agreement"]))
    return Group(t, s)


def paste_args(model_args: str, output: str | Path) -> str:
    """The ``--model_args`` string for lm_eval that evaluates the recipe."""
    path = str(Path(output).resolve())
    if "," in path:
        raise SearchError(f"--output {path!r} contains a comma, which lm-eval's --model_args cannot carry; "
                          "write the recipe to a path without commas")
    return ",".join(p for p in (model_args, f"recipe={path}") if p)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``lm-eval-mx search``."""
    p = sub.add_parser(
        "search",
        help="choose each layer's (or block's) format under a bits or KL budget; write a recipe for hf-mx",
        description=(
            "Mixed precision under a budget. On one model copy, measures the KL(baseline || MX) that each unit\n"
            "(layer or transformer block) causes alone in each candidate format, then picks the formats that\n"
            "meet the budget at the least predicted KL (the sum of the units' KLs; an exact multiple-choice\n"
            "knapsack), measures the chosen mix for real and writes a recipe for\n"
            "  lm_eval --model hf-mx --model_args pretrained=...,recipe=recipe.json\n"
            "The measurement is single-process: under accelerate launch, rank 0 measures and writes the\n"
            "recipe and the other ranks exit at once."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  lm-eval-mx search --model_args pretrained=PATH,dtype=bfloat16 --candidates fp4_e2m1,fp8_e4m3,bf16 "
            "--bits 6\n"
            "  lm-eval-mx search --model_args pretrained=PATH --candidates fp4,fp6,fp8 --max_kl 0.05 "
            "--granularity block --config roles=mlp,weight_only=True\n"
            "  lm-eval-mx search --from recipe.json --bits 5 --output recipe5.json     (re-solve, no re-measuring)\n"
            "  lm-eval-mx search ... --bits 5.5 --validate arc_easy_offline,piqa_offline --limit 200\n"
            "Bits are storage bits per selected weight, block scales included (fp8 8.25, fp6 6.25, fp4 4.25, "
            "nvfp4 4.5, bf16 16)."
        ),
    )
    p.add_argument("--model_args", default=None,
                   help="hf model args without MX keys, e.g. pretrained=PATH,dtype=bfloat16 (with --from: the "
                        "recipe's by default)")
    p.add_argument("--candidates", default=None,
                   help="comma-separated formats to choose from, e.g. fp4_e2m1,fp6_e2m3,fp8_e4m3,bf16 (any format "
                        "name lm-eval-mx formats lists, nvfp4; bf16 = high precision); with --from a subset of "
                        "the recipe's")
    p.add_argument("--bits", type=float, default=None, help="budget: average bits per selected weight (scales included)")
    p.add_argument("--max_kl", type=float, default=None,
                   help="budget: predicted KL(baseline || MX) in nats/token; with --bits: the cheapest such mix, "
                        "refused if it needs more than --bits")
    p.add_argument("--config", default=None, metavar="MX_ARGS",
                   help="the selection and numerics, in model_args syntax (roles=, include=, exclude=, block_size=, "
                        "weight_only=True, ...); the search decides the formats (default: attention + MLP, W+A)")
    p.add_argument("--granularity", choices=GRANULARITIES, default=None,
                   help="one format per layer (default) or per transformer block")
    p.add_argument("--corpus", nargs="+", default=None, metavar="TXT", help="text files (default: tasks/corpus/*.txt)")
    p.add_argument("--max_tokens", type=int, default=None,
                   help=f"corpus tokens measured (default {DEFAULT_MAX_TOKENS})")
    p.add_argument("--max_length", type=int, default=None, help=f"tokens per sequence (default {DEFAULT_MAX_LENGTH})")
    p.add_argument("--batch_size", type=int, default=None,
                   help=f"sequences per forward of the measurement (recorded in the recipe: --from measures in the "
                        f"recipe's batches) and of --validate's evaluation (default {DEFAULT_BATCH_SIZE})")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:0 ... (default: cuda if available, else cpu)")
    p.add_argument("--output", default=None, metavar="JSON",
                   help=f"the recipe (default {DEFAULT_OUTPUT}; never the --from file). If no mix meets the budget, "
                        "the measurements go to <output>.measurements.json instead, for --from")
    p.add_argument("--from", dest="from_", default=None, metavar="JSON",
                   help="re-solve a recipe's cached sensitivities for a new budget (only the new mix is measured)")
    p.add_argument("--no_measure", action="store_true", help="do not measure the chosen mix (its KL stays a prediction)")
    p.add_argument("--validate", default=None, metavar="TASKS",
                   help="then evaluate baseline, the recipe and each uniform candidate on these lm-eval tasks (compare)")
    p.add_argument("--limit", type=float, default=None, help="with --validate: examples per task (int) or fraction")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def process_rank() -> tuple[int, int]:
    """(rank, world size) of this process as a launcher (accelerate, torchrun, MPI) set them."""
    def first(keys: tuple[str, ...], default: int) -> int:
        return next((int(os.environ[k]) for k in keys if os.environ.get(k, "").strip().isdigit()), default)

    return (first(("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"), 0),
            first(("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"), 1))


def _check_args(ns: argparse.Namespace, cached: dict[str, Any] | None) -> None:
    """Every option checked before the model loads (the measurement takes minutes)."""
    from ..algorithms.divergence import check_args
    from .args import check_run_args

    if ns.limit is not None and not ns.validate:
        raise SearchError("--limit limits the --validate evaluation: give --validate TASKS too")
    batch_size = DEFAULT_BATCH_SIZE if ns.batch_size is None else ns.batch_size
    try:  # the corpus options as divergence takes them, then --validate's as compare does
        check_args(max_length=DEFAULT_MAX_LENGTH if ns.max_length is None else ns.max_length, batch_size=batch_size,
                   max_tokens=ns.max_tokens, sensitivity=None, top_k=None)
        check_run_args(ns.limit, batch_size)
    except ValueError as e:
        raise SearchError(str(e)) from None
    if cached is not None and ns.batch_size is not None and not ns.validate:
        raise SearchError("--from measures in the recipe's own batches (its corpus.batch_size); --batch_size sets only "
                          "the --validate evaluation's: drop it or give --validate")
    if cached is not None:
        given = [k for k in _MEASUREMENT_OPTIONS if getattr(ns, k) is not None]
        if given:
            raise SearchError(f"--from reuses the recipe's measurements, made with its own {', '.join(given)}: "
                              "drop --" + ", --".join(given) + " (or run a new search)")
    elif ns.model_args is None:
        raise SearchError("--model_args is required (pretrained=PATH,...), unless --from re-solves a recipe")
    model_args = _parse(ns.model_args or (cached or {}).get("model", ""), "--model_args")
    mx = [k for k in model_args if k in MX_KEYS]
    if mx:
        raise SearchError(f"put MX keys ({', '.join(mx)}) in --config, not --model_args")
    _device(ns.device, model_args)
    if ns.config is not None and not ns.config.strip():
        raise SearchError("--config is empty: give MX keys (roles=, include=, block_size=, weight_only=True, ...) or "
                          "leave it out (attention + MLP, weights and activations)")
    if ns.config:
        _parse(ns.config, "--config")
    _check_output(ns)


def measurements_path(output: str | Path) -> Path:
    """Where a search whose budget no mix meets keeps its measurements (never the recipe's own path)."""
    out = Path(output)
    return out.with_name(f"{out.stem}.measurements.json")


def _check_output(ns: argparse.Namespace) -> None:
    """``--output`` (default recipe.json): a file in an existing writable directory, not the ``--from`` recipe;
    checked before the measurement (minutes), not when writing."""
    if ns.output is None:
        ns.output = DEFAULT_OUTPUT
    out = Path(ns.output)
    if out.is_dir() or not out.parent.is_dir():  # whether the directory takes the file: check_writable_dir below
        raise SearchError(f"--output {ns.output}: not a file in an existing writable directory")
    if out.exists() and not os.access(out, os.W_OK):
        raise SearchError(f"--output {ns.output}: the file is not writable")
    from .args import check_writable_dir

    try:  # os.access says yes to root everywhere: a real entry made and removed says what a write will meet
        check_writable_dir(out.parent, f"--output {ns.output}: its directory")
    except ValueError as e:
        raise SearchError(str(e)) from None
    if ns.from_ and out.resolve() == Path(ns.from_).resolve():
        raise SearchError(f"--output {ns.output} is the --from recipe; the search does not overwrite its input: "
                          "give another --output, e.g. --output recipe_new.json")


def _validate_tasks(tasks: str) -> tuple[list[str], Any]:
    """The --validate task names, checked before the (long) measurement, and the task manager that knows them."""
    from ..hf.tasks import tasks_dir
    from .args import check_tasks, task_manager_for

    names = [t for t in tasks.split(",") if t]
    try:
        manager = task_manager_for(names, [str(tasks_dir())])
        check_tasks(names, manager, "--validate")
    except ValueError as e:
        raise SearchError(str(e)) from None
    return names, manager


def _texts(files: list[str] | None) -> list[str]:
    from ..algorithms.corpus import read_corpus

    try:
        return read_corpus(files)
    except ValueError as e:
        raise SearchError(str(e)) from None


def _load(model_args: str, device: str | None) -> Any:
    """The model once, in high precision, with MX switchable (hf-mx's loading: dtype, gguf_file, ...)."""
    from ..hf.model import HFMXLM

    base = _parse(model_args, "--model_args")
    base["device"] = _device(device, base)
    return HFMXLM(**base, roles="none", mx_keep_original=True)


def _parse(text: str, what: str) -> dict[str, Any]:
    """``key=value,...`` as compare parses it (a key given twice is refused)."""
    from .args import parse_kv

    try:
        return parse_kv(text, what)
    except ValueError as e:
        raise SearchError(str(e)) from None


def _device(device: str | None, model_args: dict[str, Any]) -> str:
    """``--device``, else model_args' device, else cuda when available, else cpu (hf's own default is cuda)."""
    from .args import resolve_device

    try:
        return resolve_device(device, model_args)
    except ValueError as e:
        raise SearchError(str(e)) from None


def _solve(units: list[Any], candidates: tuple[str, ...], sens: dict[str, dict[str, float]], bits: float | None,
           max_kl: float | None) -> Any:
    """The solver's mix, refused when it keeps every unit in high precision (hf-mx refuses a recipe that puts
    nothing in MX)."""
    solution = solve(units, candidates, sens, bits, max_kl)
    if all(f == HP for f in solution.assignment.values()):
        budget = " and ".join(f"{k} {v:g}" for k, v in (("--bits", bits), ("--max_kl", max_kl)) if v is not None)
        raise SearchError(f"with {budget} the best mix keeps every unit in {HP}: "
                          f"nothing would go to MX, and hf-mx refuses such a recipe; lower --bits, raise --max_kl "
                          f"or drop {HP} from --candidates")
    return solution


def _timed(fn: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    return fn(), time.perf_counter() - t0


def main(ns: argparse.Namespace) -> int:
    """Run ``lm-eval-mx search`` (see :func:`add_parser`)."""
    rank, world = process_rank()
    if rank > 0:
        print(f"lm-eval-mx search: rank {rank} of {world} exits; the measurement is single-process "
              "(rank 0 measures and writes the recipe)", file=sys.stderr)
        return 0
    if world > 1:  # rank 0 alone: accelerate/HFLM must not wait for the ranks that exited
        for key in _DIST_ENV:
            os.environ.pop(key, None)
    from ..selection.apply import SelectionError

    try:
        return _run(ns)
    except (SearchError, SelectionError) as e:
        raise SystemExit(f"search: {e}") from None


def _run(ns: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(width=160)
    cached = read_search(ns.from_) if ns.from_ else None
    _check_args(ns, cached)
    check_budget(ns.bits, ns.max_kl)
    if cached is not None:
        candidates = tuple(cached["candidates"])
        if ns.candidates:
            chosen = parse_candidates(ns.candidates)
            extra = [c for c in chosen if c not in candidates]
            if extra:
                raise SearchError(f"--from has sensitivities for {','.join(candidates)} only, not {','.join(extra)}; "
                                  "run a new search to measure other formats")
            candidates = chosen
        config_args, granularity = dict(cached["config"]), cached["granularity"]
        corpus = dict(cached["corpus"])
        model_args = ns.model_args if ns.model_args is not None else cached["model"]
        if model_args != cached["model"]:
            console.print(f"note: the sensitivities were measured with --model_args {cached['model']}")
    else:
        if not ns.candidates:
            raise SearchError("--candidates is required, e.g. fp4_e2m1,fp8_e4m3,bf16")
        candidates = parse_candidates(ns.candidates)
        config_args = _parse(ns.config, "--config") if ns.config else {}
        granularity, model_args = ns.granularity or "layer", ns.model_args
        corpus = {"files": [str(Path(f).resolve()) for f in ns.corpus] if ns.corpus else None,
                  "max_tokens": ns.max_tokens or DEFAULT_MAX_TOKENS, "max_length": ns.max_length or DEFAULT_MAX_LENGTH,
                  "batch_size": ns.batch_size or DEFAULT_BATCH_SIZE}
    config = search_config(config_args)
    configs = candidate_configs(config, candidates)
    fixed = [format_bits(config, f) for f in candidates if f == HP or configs[f].scheme(f).block_size]
    if ns.bits is not None and len(fixed) == len(candidates) and Fraction(str(ns.bits)) < min(fixed):
        raise SearchError(f"--bits {ns.bits:g} is below the cheapest candidate, "
                          f"{min(candidates, key=lambda f: format_bits(config, f))} at {float(min(fixed)):g} bits")
    tasks = _validate_tasks(ns.validate) if ns.validate else None  # (names, task manager)
    paste = paste_args(model_args, ns.output)
    timing: dict[str, float] = {}
    solution = None
    if cached is not None:  # re-solve first: an infeasible budget fails before any model load
        units = units_from_recipe(cached)
        sens = {u: {f: s[f] for f in candidates} for u, s in cached["sensitivities"].items()}
        uniform = {f: row for f, row in cached["uniform"].items() if f in candidates}
        solution, timing["solve_s"] = _timed(lambda: _solve(units, candidates, sens, ns.bits, ns.max_kl))
    measurer = lm = None
    if cached is None or not ns.no_measure:
        texts = _texts(corpus["files"])  # a bad corpus file fails before the model loads
        t0 = time.perf_counter()
        lm = _load(model_args, ns.device)
        from ..algorithms.corpus import token_batches

        # the recipe's batches: per-tensor activation scales (NVFP4) see a whole batch, so a new mix is
        # measured as its sensitivities were
        batches = token_batches(lm.tokenizer, texts, corpus["max_length"], corpus.get("batch_size", DEFAULT_BATCH_SIZE),
                                corpus["max_tokens"])
        if not batches:
            raise SearchError("the corpus gave no token sequence longer than one token")
        held = sum(int(b[:, 0].sum()) for b in batches)
        if held < corpus["max_tokens"]:
            console.print(f"note: the corpus holds {held} tokens, fewer than max_tokens {corpus['max_tokens']}: "
                          "all of it is measured (--corpus adds text)")
        measurer = Measurer(lm.model, config, candidates, granularity, batches, lm.device)
        timing["load_s"] = time.perf_counter() - t0
    if cached is None:
        assert measurer is not None
        t0 = time.perf_counter()
        sens = measurer.sensitivities(progress=not ns.quiet)
        units = measurer.units
        uniform = {}
        for f in candidates:
            mix = {u.name: f for u in units}
            uniform[f] = {"avg_bits": float(mix_bits(units, mix)), "predicted_kl": sum(sens[u.name][f] for u in units),
                          **measurer.measure(mix)}
        corpus["tokens"] = measurer.tokens
        timing["measure_s"] = time.perf_counter() - t0
        try:
            solution, timing["solve_s"] = _timed(lambda: _solve(units, candidates, sens, ns.bits, ns.max_kl))
        except SearchError as e:  # keep the measurements (not as a recipe): a new budget re-solves them with --from
            kept = measurements_path(ns.output)
            kept.write_text(json.dumps({
                "note": "measurements only, not a recipe for hf-mx: no mix met the budget; re-solve with --from",
                "uniform": uniform, "candidates": list(candidates), "granularity": granularity, "config": config_args,
                "model": model_args, "corpus": corpus, **_cache(units, sens)}, indent=2) + "\n")
            raise SearchError(f"{e}. No recipe written; the measurements are saved in {kept}: re-solve with "
                              f"lm-eval-mx search --from {kept} and another budget") from None
    elif measurer is not None:
        now = {u.name: (u.layers, u.params) for u in measurer.units}
        if now != {u.name: (u.layers, u.params) for u in units}:
            raise SearchError(f"--from: this model's {granularity}s differ from the recipe's (another model or "
                              "selection?); run a new search")
        if measurer.tokens != corpus["tokens"]:
            raise SearchError(f"--from: the corpus now gives {measurer.tokens} tokens, the recipe measured "
                              f"{corpus['tokens']}; run a new search")
    assert solution is not None
    measured = None
    if measurer is not None and not ns.no_measure:
        measured, timing["final_measure_s"] = _timed(lambda: measurer.measure(solution.assignment))
    recipe = build_recipe(config_args=config_args, model_args=model_args, candidates=candidates,
                          granularity=granularity, units=units, sensitivities=sens, solution=solution,
                          budget={"bits": ns.bits, "max_kl": ns.max_kl}, measured=measured, uniform=uniform,
                          corpus=corpus, timing=timing)
    out = Path(ns.output)
    out.write_text(json.dumps(recipe, indent=2) + "\n")
    console.print(render(recipe))
    console.print(f"wrote {out}; evaluate it with:\n  lm_eval --model hf-mx --model_args {paste} --tasks ...")
    if tasks:
        measurer = lm = None  # free the measured copy: compare loads its own
        _validate(recipe, paste, config_args, candidates, tasks, ns)
    return 0


def _validate(recipe: dict[str, Any], paste: str, config_args: dict[str, Any], candidates: tuple[str, ...],
              tasks: tuple[list[str], Any], ns: argparse.Namespace) -> None:
    """Baseline vs the recipe vs each uniform MX candidate on lm-eval tasks: compare's table, printed and
    written (md/csv/json/png) to ``<output>_validate/``."""
    import gc

    from rich.console import Console

    from .args import check_run_args
    from .compare import run_configs
    from .results_table import build_rows, rich_table, write_outputs

    gc.collect()
    base = {k: v for k, v in _parse(paste, "--model_args").items() if k != "recipe"}
    recipe_cfg, _ = parse_mx_args({"recipe": str(Path(ns.output).resolve())})
    configs = [(f"search {recipe['avg_bits']:.2f}b", recipe_cfg)]
    config = search_config(config_args)
    for f in candidates:
        if f != HP:
            unused = e8m0_keys_unused_by(config, f)  # scale_mode/scale_bits: for the MX candidates only
            args = {k: v for k, v in config_args.items() if k not in unused}
            configs.append((f"{f} {recipe['uniform'][f]['avg_bits']:.2f}b", parse_mx_args({**args, "format": f})[0]))
    limit, batch_size = check_run_args(ns.limit, ns.batch_size or DEFAULT_BATCH_SIZE)
    names, manager = tasks
    runs = run_configs(base, configs, names, limit=limit, batch_size=batch_size, device=_device(ns.device, base),
                       task_manager=manager)
    console = Console(width=240)  # baseline + one column pair per mix
    console.print(rich_table(build_rows(runs[0], runs[1:]), [r.label for r in runs[1:]]))
    out = Path(ns.output)
    paths = write_outputs(runs, out.with_name(f"{out.stem}_validate"))
    console.print("wrote " + ", ".join(str(p) for p in paths.values()))

"""Recipes: the JSON a search writes (its ``model_args`` are hf-mx keys) and reads back to re-solve.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...selection.config import read_json
from .solver import Solution
from .units import GRANULARITIES, HP, SearchError, Unit, _exact, e8m0_keys_unused_by, parse_candidates

if TYPE_CHECKING:
    pass


def recipe_model_args(config_args: dict[str, Any], units: list[Unit], assignment: dict[str, str]) -> dict[str, Any]:
    """The MX keys of a recipe: the --config keys plus one anchored ``layer_formats`` rule per unit; the keys
    of E8M0 scales (scale_mode, scale_bits) only when some chosen format has such scales (hf-mx refuses a key
    that nothing uses, and nvfp4 was measured without them)."""
    from .units import E8M0_KEYS, search_config

    args = dict(config_args)
    if any(k in args for k in E8M0_KEYS):
        config = search_config(config_args)
        chosen = {f for f in assignment.values() if f != HP}
        if chosen and all(e8m0_keys_unused_by(config, f) for f in chosen):
            args = {k: v for k, v in args.items() if k not in E8M0_KEYS}
    return {**args, "layer_formats": [[u.pattern, assignment[u.name]] for u in units]}


def units_from_recipe(data: dict[str, Any]) -> list[Unit]:
    return [Unit(name, tuple(data["layers"][name]), int(data["params"][name]),
                 {f: _exact(b) for f, b in data["unit_bits"][name].items()}) for name in data["layers"]]


_CACHE_KEYS = ("candidates", "granularity", "config", "layers", "params", "unit_bits", "sensitivities", "corpus")


def read_search(path: str | Path) -> dict[str, Any]:
    """A recipe written by ``lm-eval-mx search``, with the cached measurements that ``--from`` re-solves."""
    p = Path(path)
    data = read_json(p, "--from", SearchError)
    missing = [k for k in _CACHE_KEYS if not isinstance(data, dict) or k not in data]
    if missing:
        raise SearchError(f"--from: {str(p)!r} lacks {', '.join(missing)}: only a recipe written by "
                          "lm-eval-mx search caches the sensitivities to re-solve")
    try:
        _check_cache(data)
    except SearchError as e:
        raise SearchError(f"--from {str(p)!r}: {e} (an edited or partial recipe? run a new search)") from None
    return data


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_cache(data: dict[str, Any]) -> None:
    """Every field ``--from`` reads, of the type and over the units and candidates it needs: an edited or
    partial recipe is a one-line error naming the field, not a KeyError deep in the solver."""
    cands = data["candidates"]
    if not isinstance(cands, list) or not all(isinstance(c, str) for c in cands):
        raise SearchError(f"candidates must be a list of format names, got {cands!r}")
    try:
        canonical = parse_candidates(cands)
    except SearchError as e:
        raise SearchError(f"candidates: {str(e).removeprefix('--candidates: ')}") from None
    if list(canonical) != cands:
        raise SearchError(f"candidates {cands!r} are not as lm-eval-mx search writes them ({list(canonical)!r})")
    if data["granularity"] not in GRANULARITIES:
        raise SearchError(f"granularity must be one of {', '.join(GRANULARITIES)}, got {data['granularity']!r}")
    if not isinstance(data["config"], dict):
        raise SearchError(f"config must be an object of MX keys, got {data['config']!r}")
    if not isinstance(data.get("model"), str):
        raise SearchError(f"model must be the --model_args string, got {data.get('model')!r}")
    for key in ("layers", "params", "unit_bits", "sensitivities"):
        if not isinstance(data[key], dict) or not data[key]:
            raise SearchError(f"{key} must be a non-empty object keyed by unit, got {data[key]!r}")
    units = list(data["layers"])
    for key in ("params", "unit_bits", "sensitivities"):
        if set(data[key]) != set(units):
            odd = sorted(set(data[key]) ^ set(units))
            raise SearchError(f"{key} and layers name different units ({', '.join(odd[:3])}"
                              f"{', ...' if len(odd) > 3 else ''})")
    for unit in units:
        layers, params = data["layers"][unit], data["params"][unit]
        if not isinstance(layers, list) or not layers or not all(isinstance(n, str) for n in layers):
            raise SearchError(f"layers[{unit!r}] must be a list of layer names, got {layers!r}")
        if isinstance(params, bool) or not isinstance(params, int) or params < 1:
            raise SearchError(f"params[{unit!r}] must be an integer >= 1, got {params!r}")
        for key in ("unit_bits", "sensitivities"):
            row = data[key][unit]
            if not isinstance(row, dict):
                raise SearchError(f"{key}[{unit!r}] must be an object keyed by candidate, got {row!r}")
            absent = [c for c in cands if c not in row]
            if absent:
                raise SearchError(f"{key}[{unit!r}] lacks candidate {', '.join(absent)} (candidates: {', '.join(cands)})")
            bad = next((c for c in cands if not _number(row[c])), None)
            if bad is not None:
                raise SearchError(f"{key}[{unit!r}][{bad!r}] must be a number, got {row[bad]!r}")
            if key == "unit_bits" and not all(0 < row[c] < float("inf") for c in cands):
                raise SearchError(f"unit_bits[{unit!r}] must be positive finite bits, got {row!r}")
    corpus = data["corpus"]
    if not isinstance(corpus, dict):
        raise SearchError(f"corpus must be an object, got {corpus!r}")
    for key in ("tokens", "max_tokens", "max_length", "batch_size"):
        value = corpus.get(key, 4 if key == "batch_size" else None)  # recipes before batch_size measured in 4s
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SearchError(f"corpus.{key} must be an integer >= 1, got {value!r}")
    files = corpus.get("files")
    if files is not None and (not isinstance(files, list) or not all(isinstance(f, str) for f in files)):
        raise SearchError(f"corpus.files must be a list of paths or null, got {files!r}")
    uniform = data.get("uniform")
    if not isinstance(uniform, dict):
        raise SearchError(f"uniform must be an object of each candidate's uniform mix, got {uniform!r}")
    for c in cands:
        row = uniform.get(c)
        keys = ("avg_bits", "predicted_kl", "kl_base_mx", "top1_agreement")
        if not isinstance(row, dict) or not all(_number(row.get(k)) for k in keys):
            raise SearchError(f"uniform[{c!r}] must hold the numbers {', '.join(keys)}, got {row!r}")
    if HP in cands and any(data["sensitivities"][u][HP] != 0 for u in units):
        raise SearchError(f"sensitivities of {HP} must be 0 (high precision is the baseline)")


def _json_number(x: Fraction) -> int | float:
    return int(x) if x.denominator == 1 else float(x)


def _cache(units: list[Unit], sensitivities: dict[str, dict[str, float]]) -> dict[str, Any]:
    """What ``--from`` re-solves from: KL per unit and format, weights, bits and layers of each unit."""
    return {
        "sensitivities": sensitivities,
        "params": {u.name: u.params for u in units},
        "unit_bits": {u.name: {f: _json_number(b) for f, b in u.bits.items()} for u in units},
        "layers": {u.name: list(u.layers) for u in units},
    }


def build_recipe(*, config_args: dict[str, Any], model_args: str, candidates: tuple[str, ...], granularity: str,
                 units: list[Unit], sensitivities: dict[str, dict[str, float]], solution: Solution,
                 budget: dict[str, float | None], measured: dict[str, float] | None,
                 uniform: dict[str, dict[str, float]], corpus: dict[str, Any], timing: dict[str, float]) -> dict:
    """The recipe file's content: ``model_args`` for hf-mx, the numbers, and the cached measurements."""
    from ... import __version__

    return {
        "model_args": recipe_model_args(config_args, units, solution.assignment),
        "avg_bits": solution.avg_bits,
        "budget": budget,
        "predicted_kl": solution.predicted_kl,
        "measured_kl": None if measured is None else measured["kl_base_mx"],
        "top1_agreement": None if measured is None else measured["top1_agreement"],
        "measured": measured,
        "assignment": solution.assignment,
        "uniform": uniform,
        "candidates": list(candidates),
        "granularity": granularity,
        "config": config_args,
        "model": model_args,
        "corpus": corpus,
        "corpus_tokens": corpus.get("tokens"),
        **_cache(units, sensitivities),
        "solver": {"method": "exact multiple-choice knapsack over Pareto-optimal (bits, KL) states",
                   "states": solution.states},
        "timing_s": timing,
        "lm_eval_mx": __version__,
    }

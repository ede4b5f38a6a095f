"""Recipes: the JSON a search writes (its ``model_args`` are hf-mx keys) and reads back to re-solve.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...selection.config import read_json
from .solver import Solution
from .units import SearchError, Unit, _exact

if TYPE_CHECKING:
    pass


def recipe_model_args(config_args: dict[str, Any], units: list[Unit], assignment: dict[str, str]) -> dict[str, Any]:
    """The MX keys of a recipe: the --config keys plus one anchored ``layer_formats`` rule per unit."""
    return {**config_args, "layer_formats": [[u.pattern, assignment[u.name]] for u in units]}


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
    return data


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

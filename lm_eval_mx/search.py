"""``lm-eval-mx search``: which format each layer (or transformer block) gets, under a bits or KL budget.

One model copy: the selected layers keep their high-precision weights (``apply_mx(keep_original=True)``)
and formats are swapped in place (:func:`layers.set_spec`), each unit's weights quantized once per
candidate. Measured on a text corpus: the KL(baseline || MX) that each unit causes alone in each
candidate format. The predicted KL of a mix is the sum of its units' KLs (interactions ignored); an
exact multiple-choice knapsack (Pareto-optimal (bits, KL) states, merged unit by unit) finds the mix
of least predicted KL under a bits budget, or the fewest bits under a KL budget. The chosen mix is
then measured for real, and written as a recipe that ``hf-mx`` reads (``recipe=recipe.json``).

The measurement runs in one process: under ``accelerate launch`` rank 0 measures and writes,
the other ranks exit at once.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import MX_KEYS, MXConfig, parse_mx_args, read_json
from .formats import HIGH_PRECISION, check_format_name

if TYPE_CHECKING:
    import torch
    from torch import nn

HP = "bf16"  # the candidate name for "keep the layer in high precision"
HP_BITS = 16  # what a high-precision weight counts, as in MXReport.avg_bits
GRANULARITIES = ("layer", "block")
DEFAULT_OUTPUT = "recipe.json"
DEFAULT_MAX_TOKENS = 8192
DEFAULT_BATCH_SIZE = 4
DEFAULT_MAX_LENGTH = 256
# --config keys the search decides or cannot honour, with the reason.
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
# Options fixed by the measurements a recipe caches (--from refuses a new value).
_MEASUREMENT_OPTIONS = ("config", "granularity", "corpus", "max_tokens", "max_length")
# Environment variables that make accelerate/torch.distributed see several processes.
_DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "PMI_RANK",
             "PMI_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK",
             "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")


class SearchError(ValueError):
    """A search input or budget that cannot be honoured (the message names it and what is allowed)."""


# ---------------------------------------------------------------------------------------------- inputs


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
        config, rest = parse_mx_args(args)
    except ValueError as e:
        raise SearchError(f"--config: {e}") from None
    if rest:
        allowed = [k for k in MX_KEYS if k not in _REFUSED]
        raise SearchError(f"--config holds MX keys only ({', '.join(allowed)}); got {', '.join(rest)}")
    if not config.selects_layers:
        raise SearchError("--config selects no linear layer (roles=none): the search needs layers to decide")
    return config


def candidate_configs(config: MXConfig, candidates: Iterable[str]) -> dict[str, MXConfig]:
    """``config`` with weights and activations in each MX candidate (validated now: e.g. nvfp4 with
    another block_size is refused before any model load)."""
    out = {}
    for fmt in candidates:
        if fmt == HP:
            continue
        try:
            out[fmt] = dataclasses.replace(config, w_format=fmt, a_format=fmt)
        except ValueError as e:
            raise SearchError(f"--candidates {fmt} with --config {config.label()}: {e}") from None
    return out


def check_budget(bits: float | None, max_kl: float | None) -> None:
    """The budget alone (its feasibility needs the model's layers: :func:`solve`)."""
    if bits is None and max_kl is None:
        raise SearchError("give a budget: --bits B (average bits per selected weight) and/or --max_kl K (nats/token)")
    if bits is not None and not (math.isfinite(bits) and bits > 0):
        raise SearchError(f"--bits must be a positive number of bits per weight, got {bits}")
    if max_kl is not None and not (math.isfinite(max_kl) and max_kl >= 0):
        raise SearchError(f"--max_kl must be a KL in nats/token >= 0, got {max_kl}")


def _exact(bits: float) -> Fraction:
    """Storage bits as an exact fraction (block scales give 1/4, 1/2, or 1/row with block_size=0)."""
    return Fraction(bits).limit_denominator(1 << 24)


def format_bits(config: MXConfig, fmt: str, row: int | None = None) -> Fraction:
    """Bits per weight of a candidate, block scales included (``row`` is needed with block_size=0)."""
    return Fraction(HP_BITS) if fmt == HP else _exact(config.scheme(fmt).bits(row))


# ---------------------------------------------------------------------------------------------- units


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


def _blocks(model: nn.Module) -> list[str]:
    """The transformer blocks of ``model`` in order: every child of the list(s) holding its MX blocks."""
    from .divergence import units_of

    out: list[str] = []
    for unit, layers in units_of(model, "block").items():
        if layers == {unit}:
            continue  # a layer outside any block
        parent = unit.rpartition(".")[0]
        for child, _ in model.get_submodule(parent).named_children():
            if f"{parent}.{child}" not in out:
                out.append(f"{parent}.{child}")
    return out


class _Replay:
    """Blocks that finish before a measurement's first MX layer compute exactly what the baseline computed:
    their outputs, recorded in the baseline pass, are replayed instead of recomputed (a unit in block k
    costs the blocks from k on, not the whole model). Checked once against a full forward; off (with a
    note) when a block or MX layer runs twice per forward or the replayed forward is not bit-identical."""

    def __init__(self, model: nn.Module, blocks: list[str], layers: list[str]) -> None:
        self.model, self.layers = model, layers
        self.blocks = {b: model.get_submodule(b) for b in blocks}
        self.outputs: dict[str, list[Any]] = {b: [] for b in blocks}
        self.order: dict[str, int] = {}  # position in the forward: ("end", block) and ("start", layer)
        self.batch = 0
        self.ok = bool(blocks)
        self.note: str | None = None

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Hooks for the baseline pass: each block's output per batch, and (in the first batch) the order
        in which blocks end and MX layers start. Call :meth:`next_batch` after each batch."""
        seen: set[str] = set()

        def mark(key: str) -> None:
            if self.batch:
                return
            if key in seen:
                self.ok, self.note = False, f"{key.split(' ', 1)[1]} runs more than once per forward"
            seen.add(key)
            self.order.setdefault(key, len(self.order))

        def block_hook(name: str) -> Any:
            def hook(module: nn.Module, args: Any, out: Any) -> None:
                mark(f"end {name}")
                self.outputs[name].append(out)
            return hook

        def layer_hook(name: str) -> Any:
            return lambda module, args: mark(f"start {name}")

        modules = dict(self.model.named_modules())
        handles = [m.register_forward_hook(block_hook(b)) for b, m in self.blocks.items()]
        handles += [modules[n].register_forward_pre_hook(layer_hook(n)) for n in self.layers]
        self.batch = 0
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def next_batch(self) -> None:
        self.batch += 1

    def replayable(self, mx: set[str]) -> list[str]:
        """Blocks whose forward ends before the first of the ``mx`` layers starts."""
        if not self.ok or not mx:
            return []
        start = min(self.order.get(f"start {n}", -1) for n in mx)
        return [b for b in self.blocks if self.order.get(f"end {b}", math.inf) < start]

    @contextlib.contextmanager
    def replaying(self, blocks: list[str]) -> Iterator[None]:
        """These blocks return their recorded output of batch ``self.batch`` instead of computing it."""
        saved = {b: self.blocks[b].__dict__.get("forward") for b in blocks}  # accelerate hooks set one
        try:
            for b in blocks:
                self.blocks[b].forward = lambda *a, _b=b, **k: self.outputs[_b][self.batch]
            yield
        finally:
            for b, fwd in saved.items():
                if fwd is None:
                    del self.blocks[b].forward
                else:
                    self.blocks[b].forward = fwd


class Measurer:
    """One model copy whose selected layers switch formats in place; measures KL against its baseline.

    ``apply_mx(keep_original=True)`` once, then per unit and format :func:`layers.set_spec` with weights
    quantized once (:func:`layers.quantized_weights`); the baseline log-probabilities are computed once.
    """

    def __init__(self, model: nn.Module, config: MXConfig, candidates: tuple[str, ...], granularity: str,
                 batches: list[torch.Tensor], device: torch.device | str, replay: bool = True) -> None:
        from .divergence import units_of
        from .layers import mx_layers
        from .selection import apply_mx, layer_spec, reduction_dims, select

        self.model, self.candidates, self.batches, self.device = model, candidates, batches, device
        configs = candidate_configs(config, candidates)
        selected, _, _ = select(model, config)  # raises SelectionError naming the model's layers
        rows = {c.name: next(iter(reduction_dims(c.module, c.kind).values())) for c in selected}
        params = {c.name: c.numel for c in selected}
        apply_mx(model, next(iter(configs.values())), keep_original=True)
        self.modules = dict(mx_layers(model))
        self.specs = {fmt: {c.name: layer_spec(cfg, c) for c in selected} for fmt, cfg in configs.items()}
        self.units = []
        for name, layers in units_of(model, granularity).items():
            ordered = tuple(n for n in self.modules if n in layers)
            bits = {f: sum((params[n] * format_bits(config, f, rows[n]) for n in ordered), Fraction(0))
                    for f in candidates}
            self.units.append(Unit(name, ordered, sum(params[n] for n in ordered), bits))
        self._baseline: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.replay = _Replay(model, _blocks(model), list(self.modules)) if replay else None

    @property
    def tokens(self) -> int:
        return sum(int(t.numel()) for _, t in self.baseline())

    def baseline(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Log-probabilities and targets of every batch with MX off (computed once, kept on the device)."""
        if self._baseline is None:
            from .divergence import _logprobs
            from .layers import mx_disabled

            replay = self.replay
            with mx_disabled(self.model):
                if replay is None:
                    self._baseline = [_logprobs(self.model, b, self.device) for b in self.batches]
                    return self._baseline
                self._baseline = []
                with replay.recording():
                    for batch in self.batches:
                        self._baseline.append(_logprobs(self.model, batch, self.device))
                        replay.next_batch()
                self._check_replay()
        return self._baseline

    def _check_replay(self) -> None:
        """Replay every block but the last on the first batch: the log-probabilities must be bit-identical."""
        import torch

        from .divergence import _logprobs
        from .layers import mx_disabled

        replay = self.replay
        assert replay is not None and self._baseline is not None
        if replay.ok:
            blocks = list(replay.blocks)[:-1]
            replay.batch = 0
            try:
                with mx_disabled(self.model), replay.replaying(blocks):
                    same = torch.equal(_logprobs(self.model, self.batches[0], self.device)[0], self._baseline[0][0])
                if not same:
                    replay.note = "the replayed forward is not bit-identical to the full one"
            except Exception as e:  # any failure means: measure with full forwards
                same, replay.note = False, f"replaying failed ({type(e).__name__}: {e})"
            replay.ok = same
        if not replay.ok:
            replay.outputs.clear()
            print(f"note: every measurement runs the whole model: {replay.note}", file=sys.stderr)

    def _install(self, assignment: dict[str, str]) -> set[str]:
        """Put each unit's layers in its format (weights quantized here, once); the names now in MX."""
        from .layers import set_spec

        units = {u.name: u for u in self.units}
        on: set[str] = set()
        for unit, fmt in assignment.items():
            if fmt == HP:
                continue
            for name in units[unit].layers:
                set_spec(self.modules[name], self.specs[fmt][name])
                on.add(name)
        return on

    def kl(self, assignment: dict[str, str], stats: Any = None) -> float:
        """KL(baseline || mix) in nats per token; units not in ``assignment`` stay in high precision.
        ``stats`` (a divergence.TokenStats) also gets every batch."""
        from .divergence import _logprobs, kl_sum
        from .layers import mx_only

        baseline = self.baseline()
        total = 0.0
        on = self._install(assignment)
        replay = self.replay
        skip = replay.replayable(on) if replay is not None else []
        with mx_only(self.model, on), (replay.replaying(skip) if skip and replay else contextlib.nullcontext()):
            for i, (batch, (lb, targets)) in enumerate(zip(self.batches, baseline)):
                if replay is not None:
                    replay.batch = i
                lm, _ = _logprobs(self.model, batch, self.device)
                total += kl_sum(lb, lm)
                if stats is not None:
                    stats.add(lb, lm, targets)
        return total / max(sum(int(t.numel()) for _, t in baseline), 1)

    def measure(self, assignment: dict[str, str]) -> dict[str, float]:
        """KL, top-1 agreement, cross-entropies and perplexities of a mix (divergence's TokenStats)."""
        from .divergence import TokenStats

        if all(f == HP for f in assignment.values()):
            n = self.tokens
            return {"tokens": n, "kl_base_mx": 0.0, "top1_agreement": 1.0}  # the baseline itself
        stats = TokenStats()
        self.kl(assignment, stats)
        return stats.summary()

    def sensitivities(self, progress: bool = True) -> dict[str, dict[str, float]]:
        """KL (nats/token) that each unit causes alone in each candidate; high precision is 0 by construction."""
        from tqdm.auto import tqdm

        self.baseline()
        plan = [(u.name, f) for u in self.units for f in self.candidates if f != HP]
        out: dict[str, dict[str, float]] = {u.name: {} for u in self.units}
        bar = tqdm(plan, desc="search: KL of each unit alone", unit="pass", disable=not progress, dynamic_ncols=True)
        for unit, fmt in bar:
            bar.set_postfix_str(f"{unit} {fmt}", refresh=False)
            out[unit][fmt] = self.kl({unit: fmt})
        for unit in out:
            if HP in self.candidates:
                out[unit][HP] = 0.0
            out[unit] = {f: out[unit][f] for f in self.candidates}
        return out


# ---------------------------------------------------------------------------------------------- solver


@dataclass
class Frontier:
    """Pareto-optimal mixes: integer total bits (in units of 1/``scale`` bit) increasing, KL strictly
    decreasing; ``parents``/``choices`` per unit rebuild each state's assignment."""

    bits: np.ndarray
    kl: np.ndarray
    parents: list[np.ndarray] = field(default_factory=list)
    choices: list[np.ndarray] = field(default_factory=list)

    def assignment(self, state: int) -> list[int]:
        """The candidate index of every unit in one final state."""
        out = []
        for parents, choices in zip(reversed(self.parents), reversed(self.choices)):
            out.append(int(choices[state]))
            state = int(parents[state])
        return out[::-1]


def pareto_frontier(costs: np.ndarray, kls: np.ndarray) -> Frontier:
    """Exact multiple-choice knapsack frontier: every mix that no other beats in both bits and KL.

    ``costs`` [units, candidates] are integers, ``kls`` [units, candidates] floats (NaN counts as +inf).
    States are merged unit by unit and dominated ones dropped, so the work grows with the number of
    distinct bit totals, not with candidates**units.
    """
    costs = np.asarray(costs, dtype=np.int64)
    kls = np.where(np.isnan(kls), np.inf, np.asarray(kls, dtype=np.float64))
    front = Frontier(np.zeros(1, np.int64), np.zeros(1, np.float64))
    n = costs.shape[1]
    for cost, kl in zip(costs, kls):
        bits = (front.bits[:, None] + cost[None, :]).ravel()
        total = (front.kl[:, None] + kl[None, :]).ravel()
        order = np.lexsort((total, bits))  # by bits, then KL
        bits, total = bits[order], total[order]
        keep = np.ones(len(total), bool)
        keep[1:] = total[1:] < np.minimum.accumulate(total)[:-1]  # strictly better than every cheaper state
        src = order[keep]
        front = Frontier(bits[keep], total[keep], [*front.parents, src // n], [*front.choices, src % n])
    return front


@dataclass
class Solution:
    """A chosen mix: the format of every unit, its average bits and predicted KL."""

    assignment: dict[str, str]
    avg_bits: float
    predicted_kl: float
    states: int  # size of the final Pareto frontier


def _integer_costs(units: list[Unit], candidates: tuple[str, ...]) -> tuple[np.ndarray, int]:
    """Each unit's bits per candidate as integers in units of 1/scale bit (exact), and the scale."""
    scale = 1
    for u in units:
        for f in candidates:
            scale = math.lcm(scale, u.bits[f].denominator)
    costs = [[int(u.bits[f] * scale) for f in candidates] for u in units]
    if max(max(c) for c in costs) * len(units) >= 1 << 62:
        raise SearchError("the bit totals are too large for exact integer arithmetic (block_size=0 with many "
                          "row lengths?); give a block_size")
    return np.array(costs, dtype=np.int64), scale


def solve(units: list[Unit], candidates: tuple[str, ...], sensitivities: dict[str, dict[str, float]],
          bits: float | Fraction | None = None, max_kl: float | None = None) -> Solution:
    """The mix of least predicted KL with average bits <= ``bits``; with ``max_kl`` the mix of fewest bits
    with predicted KL <= ``max_kl`` (refused when that exceeds ``bits``). Exact (see :func:`pareto_frontier`);
    ``bits`` is read as the decimal it prints as (5.3 is 53/10) or as an exact Fraction."""
    check_budget(bits, max_kl)
    costs, scale = _integer_costs(units, candidates)
    kls = np.array([[sensitivities[u.name][f] for f in candidates] for u in units], dtype=np.float64)
    params = sum(u.params for u in units)
    front = pareto_frontier(costs, kls)

    def avg(state: int) -> float:
        return float(Fraction(int(front.bits[state]), scale * params))

    cheapest = ", ".join(f"{f} {float(units[0].bits[f] / units[0].params):g}" for f in candidates)
    limit = None if bits is None else Fraction(str(bits)) * params * scale
    if limit is not None and front.bits[0] > limit:
        raise SearchError(f"--bits {float(bits):g} is below the cheapest mix, {avg(0):.4f} bits per weight (every unit "
                          f"in its cheapest candidate; bits per weight: {cheapest})")
    if max_kl is not None:
        ok = np.flatnonzero(front.kl <= max_kl)
        if not len(ok):
            hint = "" if HP in candidates else f"; add {HP} to --candidates to allow high precision"
            raise SearchError(f"--max_kl {max_kl:g} is below the lowest predicted KL of any mix, "
                              f"{front.kl[-1]:.6g} nats/token (every unit in its lowest-KL candidate){hint}")
        state = int(ok[0])
        if limit is not None and front.bits[state] > limit:
            within = int(np.flatnonzero(front.bits <= limit)[-1])
            raise SearchError(
                f"refused: the cheapest mix with predicted KL <= {max_kl:g} averages {avg(state):.4f} bits per "
                f"weight, above --bits {float(bits):g}; within {float(bits):g} bits the least predicted KL is "
                f"{front.kl[within]:.6g} (raise --bits or --max_kl)")
    else:
        state = int(np.flatnonzero(front.bits <= limit)[-1])
    choice = front.assignment(state)
    assignment = {u.name: candidates[c] for u, c in zip(units, choice)}
    return Solution(assignment, avg(state), float(front.kl[state]), len(front.bits))


def mix_bits(units: list[Unit], assignment: dict[str, str]) -> Fraction:
    """Average bits per selected weight of a mix (exact)."""
    total = sum((u.bits[assignment[u.name]] for u in units), Fraction(0))
    return total / sum(u.params for u in units)


# ---------------------------------------------------------------------------------------------- recipe


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
    from . import __version__

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


# ---------------------------------------------------------------------------------------------- output


def _kl(x: float | None) -> str:
    if x is None:
        return "not measured"
    return "NaN" if math.isnan(x) else f"{x:.5f}"


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
              _kl(recipe["measured_kl"]), "-" if top1 is None else f"{100 * top1:.2f}%")
    for f, row in recipe["uniform"].items():
        s.add_row(f"uniform {f}", f"{row['avg_bits']:.4f}", _kl(row["predicted_kl"]), _kl(row["kl_base_mx"]),
                  f"{100 * row['top1_agreement']:.2f}%")
    return Group(t, s)


def paste_args(model_args: str, output: str | Path) -> str:
    """The ``--model_args`` string for lm_eval that evaluates the recipe."""
    path = str(Path(output).resolve())
    if "," in path:
        raise SearchError(f"--output {path!r} contains a comma, which lm-eval's --model_args cannot carry; "
                          "write the recipe to a path without commas")
    return ",".join(p for p in (model_args, f"recipe={path}") if p)


# ---------------------------------------------------------------------------------------------- command


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
    p.add_argument("--output", default=DEFAULT_OUTPUT, metavar="JSON", help=f"the recipe (default {DEFAULT_OUTPUT})")
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
    from .compare import check_run_args
    from .divergence import check_args

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
    if ns.config:
        _parse(ns.config, "--config")


def _validate_tasks(tasks: str) -> tuple[list[str], Any]:
    """The --validate task names, checked before the (long) measurement, and the task manager that knows them."""
    from .cli import tasks_dir
    from .compare import check_tasks, task_manager_for

    names = [t for t in tasks.split(",") if t]
    try:
        manager = task_manager_for(names, [str(tasks_dir())])
        check_tasks(names, manager, "--validate")
    except ValueError as e:
        raise SearchError(str(e)) from None
    return names, manager


def _texts(files: list[str] | None) -> list[str]:
    from .divergence import read_corpus

    try:
        return read_corpus(files)
    except ValueError as e:
        raise SearchError(str(e)) from None


def _load(model_args: str, device: str | None) -> Any:
    """The model once, in high precision, with MX switchable (hf-mx's loading: dtype, gguf_file, ...)."""
    from .model import HFMXLM

    base = _parse(model_args, "--model_args")
    base["device"] = _device(device, base)
    return HFMXLM(**base, roles="none", mx_keep_original=True)


def _parse(text: str, what: str) -> dict[str, Any]:
    """``key=value,...`` as compare parses it (a key given twice is refused)."""
    from .compare import parse_kv

    try:
        return parse_kv(text, what)
    except ValueError as e:
        raise SearchError(str(e)) from None


def _device(device: str | None, model_args: dict[str, Any]) -> str:
    """``--device``, else model_args' device, else cuda when available, else cpu (hf's own default is cuda)."""
    from .compare import resolve_device

    try:
        return resolve_device(device, model_args)
    except ValueError as e:
        raise SearchError(str(e)) from None


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
    from .selection import SelectionError

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
        solution, timing["solve_s"] = _timed(lambda: solve(units, candidates, sens, ns.bits, ns.max_kl))
    measurer = lm = None
    if cached is None or not ns.no_measure:
        texts = _texts(corpus["files"])  # a bad corpus file fails before the model loads
        t0 = time.perf_counter()
        lm = _load(model_args, ns.device)
        from .divergence import token_batches

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
            solution, timing["solve_s"] = _timed(lambda: solve(units, candidates, sens, ns.bits, ns.max_kl))
        except SearchError as e:  # keep the measurements: a new budget re-solves them with --from
            Path(ns.output).write_text(json.dumps({
                "model_args": None, "note": "measurements only: no mix met the budget", "uniform": uniform,
                "candidates": list(candidates), "granularity": granularity, "config": config_args,
                "model": model_args, "corpus": corpus, **_cache(units, sens)}, indent=2) + "\n")
            raise SearchError(f"{e}. The measurements are saved in {ns.output}: re-solve with "
                              f"lm-eval-mx search --from {ns.output} and another budget") from None
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

    from .compare import build_rows, check_run_args, rich_table, run_configs, write_outputs

    gc.collect()
    base = {k: v for k, v in _parse(paste, "--model_args").items() if k != "recipe"}
    recipe_cfg, _ = parse_mx_args({"recipe": str(Path(ns.output).resolve())})
    configs = [(f"search {recipe['avg_bits']:.2f}b", recipe_cfg)]
    for f in candidates:
        if f != HP:
            configs.append((f"{f} {recipe['uniform'][f]['avg_bits']:.2f}b", parse_mx_args({**config_args, "format": f})[0]))
    limit, batch_size = check_run_args(ns.limit, ns.batch_size or DEFAULT_BATCH_SIZE)
    names, manager = tasks
    runs = run_configs(base, configs, names, limit=limit, batch_size=batch_size, device=_device(ns.device, base),
                       task_manager=manager)
    console = Console(width=240)  # baseline + one column pair per mix
    console.print(rich_table(build_rows(runs[0], runs[1:]), [r.label for r in runs[1:]]))
    out = Path(ns.output)
    paths = write_outputs(runs, out.with_name(f"{out.stem}_validate"))
    console.print("wrote " + ", ".join(str(p) for p in paths.values()))

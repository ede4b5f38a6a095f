"""The exact multiple-choice knapsack: the mix of least predicted KL under a bits budget, or the fewest
bits under a KL budget (Pareto-optimal (bits, KL) states merged unit by unit, in numpy).

The predicted KL of a mix is the sum of its units' KLs (interactions ignored).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING

import numpy as np

from .units import HP, SearchError, Unit

if TYPE_CHECKING:
    pass


def check_budget(bits: float | None, max_kl: float | None) -> None:
    """The budget alone (its feasibility needs the model's layers: :func:`solve`)."""
    if bits is None and max_kl is None:
        raise SearchError("give a budget: --bits B (average bits per selected weight) and/or --max_kl K (nats/token)")
    if bits is not None and not (math.isfinite(bits) and bits > 0):
        raise SearchError(f"--bits must be a positive number of bits per weight, got {bits}")
    if max_kl is not None and not (math.isfinite(max_kl) and max_kl >= 0):
        raise SearchError(f"--max_kl must be a KL in nats/token >= 0, got {max_kl}")


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

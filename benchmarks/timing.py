"""Timing every variant in turns, in one process: the one way benchmarks here measure (BENCHMARKS.md)."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def bench(fns: dict[str, Callable[[], object]], reps: int = 30, calls: int = 10) -> dict[str, float]:
    """Milliseconds per call of each function: the median over ``reps`` rounds of ``calls`` back-to-back
    calls between two CUDA events, the functions taking turns round by round.

    Back-to-back calls let the host run ahead of the GPU, as in a model's forward, so host overhead
    counts only where it starves the GPU; taking turns spreads clock and thermal drift over all
    functions alike (separate measurements per variant drift with the GPU's power state). Three
    warm-up calls each come first (compilation and autotuning included).
    """
    for fn in fns.values():
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(calls):
                fn()
            b.record()
            b.synchronize()
            times[name].append(a.elapsed_time(b) / calls)
    return {name: statistics.median(t) for name, t in times.items()}

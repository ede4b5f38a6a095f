"""The KL(baseline || MX) each unit causes alone in each candidate format, on one model copy.

The selected layers keep their high-precision weights (``apply_mx(keep_original=True)``) and formats are
swapped in place (:func:`lm_eval_mx.nn.layers.set_spec`), each unit's weights quantized once per candidate.
Blocks that finish before a unit's first MX layer replay their recorded baseline outputs.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from ...selection.config import MXConfig
from .units import HP, Unit, candidate_configs, format_bits

if TYPE_CHECKING:
    import torch
    from torch import nn


def _blocks(model: nn.Module) -> list[str]:
    """The transformer blocks of ``model`` in order: every child of the list(s) holding its MX blocks."""
    from ..divergence import units_of

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

    ``apply_mx(keep_original=True)`` once, then per unit and format :func:`lm_eval_mx.nn.layers.set_spec` with weights
    quantized once (:func:`layers.quantized_weights`); the baseline log-probabilities are computed once.
    """

    def __init__(self, model: nn.Module, config: MXConfig, candidates: tuple[str, ...], granularity: str,
                 batches: list[torch.Tensor], device: torch.device | str, replay: bool = True) -> None:
        from ...nn.layers import mx_layers
        from ...selection.apply import apply_mx, layer_spec, reduction_dims, select
        from ..divergence import units_of

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
            from ...nn.layers import mx_disabled
            from ..divergence import _logprobs

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

        from ...nn.layers import mx_disabled
        from ..divergence import _logprobs

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
        from ...nn.layers import set_spec

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
        from ...nn.layers import mx_only
        from ..divergence import _logprobs, kl_sum

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
        from ..divergence import TokenStats

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

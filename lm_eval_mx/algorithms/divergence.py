"""How far MX moves a model's predictions, token by token, on one model copy.

For each batch of a text corpus the model runs with MX off and on: cross-entropy,
perplexity and predictive entropy of both, KL(baseline || MX), top-1 agreement,
and the output SQNR of every MX layer against its own high-precision output on
the same input (so each layer's number is its own error, not what it inherited).
Optionally, a sensitivity ranking: the KL that each layer or transformer block
adds when it alone is in MX, and an ``exclude=`` pattern that keeps the worst in
high precision.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.layers import MXLayer, mx_disabled, mx_layers, mx_only, set_spec
from ..selection.apply import apply_mx
from ..selection.config import MXConfig
from .corpus import token_batches

_BLOCK = re.compile(r"^(.*?\.(?:layers|h|blocks|layer|decoder_layers)\.\d+)\.")


@dataclass
class TokenStats:
    """Sums over predicted tokens; means are properties."""

    tokens: int = 0
    ce_base: float = 0.0
    ce_mx: float = 0.0
    ent_base: float = 0.0
    ent_mx: float = 0.0
    kl: float = 0.0
    agree: int = 0
    nonfinite: int = 0  # predicted tokens whose MX distribution holds NaN (no top-1 prediction)

    def add(self, lb: torch.Tensor, lm: torch.Tensor, targets: torch.Tensor) -> None:
        """Add predicted tokens: log-probabilities [N, vocab] of baseline and MX, targets [N]."""
        pb, pm = lb.exp(), lm.exp()
        self.tokens += int(targets.numel())
        self.ce_base += float(-lb.gather(-1, targets[:, None]).sum())
        self.ce_mx += float(-lm.gather(-1, targets[:, None]).sum())
        self.ent_base += float(-(pb * lb).sum())
        self.ent_mx += float(-(pm * lm).sum())
        self.kl += kl_sum(lb, lm)
        nan = torch.isnan(lm).any(-1) | torch.isnan(lb).any(-1)
        self.nonfinite += int(nan.sum())
        self.agree += int(((lb.argmax(-1) == lm.argmax(-1)) & ~nan).sum())

    def summary(self) -> dict[str, float]:
        """Means per token; top-1 agreement is NaN when some token's distribution is NaN (it has no top-1), as
        the other means then are."""
        n = max(self.tokens, 1)
        return {
            "tokens": self.tokens,
            "ce_base": self.ce_base / n,
            "ce_mx": self.ce_mx / n,
            "ppl_base": _exp(self.ce_base / n),
            "ppl_mx": _exp(self.ce_mx / n),
            "entropy_base": self.ent_base / n,
            "entropy_mx": self.ent_mx / n,
            "kl_base_mx": self.kl / n,
            "top1_agreement": math.nan if self.nonfinite else self.agree / n,
            "nonfinite_tokens": self.nonfinite,
        }


def _exp(x: float) -> float:
    """exp, inf past float range (math.exp raises), NaN for NaN."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def worst_first(values: dict[str, float], higher_is_worse: bool) -> dict[str, float]:
    """``values`` sorted worst first, NaN worst of all (a NaN key would leave ``sorted`` in arbitrary order)."""
    sign = -1 if higher_is_worse else 1
    return dict(sorted(values.items(), key=lambda kv: (not math.isnan(kv[1]), sign * kv[1]
                                                       if not math.isnan(kv[1]) else 0.0)))


@dataclass
class _SQNR:
    signal: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    noise: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def hooks(self, model: nn.Module) -> list[Any]:
        def make(name: str) -> Any:
            def hook(module: MXLayer, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
                if not module.mx_enabled:
                    return
                module.mx_enabled = False
                try:
                    ref = module(*args, **kwargs)
                finally:
                    module.mx_enabled = True
                self.signal[name] += float(ref.float().pow(2).sum())
                self.noise[name] += float((ref.float() - out.float()).pow(2).sum())

            return hook

        return [m.register_forward_hook(make(n), with_kwargs=True) for n, m in mx_layers(model)]

    def db(self) -> dict[str, float]:
        """Output SQNR per layer in dB: inf for an exact layer, NaN when its output (or reference) held NaN."""
        def one(signal: float, noise: float) -> float:
            if math.isnan(signal) or math.isnan(noise):
                return math.nan
            if noise == 0:
                return math.inf
            ratio = signal / noise  # inf/inf is NaN
            return ratio if math.isnan(ratio) else 10 * math.log10(ratio) if ratio > 0 else -math.inf

        return {n: one(self.signal[n], self.noise[n]) for n in self.signal}


def _logprobs(model: nn.Module, batch: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 log-probabilities [N, vocab] of every predicted (non-padding) token, and the targets [N]."""
    lengths, ids = batch[:, 0], batch[:, 1:].to(device)
    attn = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).to(device)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn.long()).logits[:, :-1]
    mask = attn[:, 1:]
    return F.log_softmax(logits.float(), -1)[mask], ids[:, 1:][mask]


def top1(model: nn.Module, batches: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The top-1 token of every predicted token of ``batches`` (int64, flattened); -1 where the distribution holds
    NaN (no top-1)."""
    out = []
    for batch in batches:
        lp, _ = _logprobs(model, batch, device)
        out.append(torch.where(torch.isnan(lp).any(-1), -1, lp.argmax(-1)).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def agreement(preds: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Pairwise top-1 agreement (fraction of predicted tokens with the same top-1) between labelled runs on the
    same tokens; NaN where either run has a token without a top-1 (a NaN distribution)."""
    table: dict[str, dict[str, float]] = {}
    for a, pa in preds.items():
        table[a] = {}
        for b, pb in preds.items():
            if pa.shape != pb.shape:
                raise ValueError(f"top-1 agreement: {a} and {b} were measured on different tokens")
            bad = bool((pa < 0).any() or (pb < 0).any())
            table[a][b] = math.nan if bad or not pa.numel() else float((pa == pb).float().mean())
    return table


def kl_sum(lb: torch.Tensor, lm: torch.Tensor) -> float:
    """Sum over tokens of KL(baseline || MX) from log-probabilities."""
    return float((lb.exp() * (lb - lm)).sum())


def units_of(model: nn.Module, granularity: str) -> dict[str, set[str]]:
    """MX layers grouped per transformer block (``block``) or one per layer (``layer``)."""
    groups: dict[str, set[str]] = defaultdict(set)
    for name, _ in mx_layers(model):
        m = _BLOCK.match(name) if granularity == "block" else None
        groups[m.group(1) if m else name].add(name)
    return dict(groups)


def exclude_pattern(units: list[str], granularity: str) -> str:
    """A regex for ``exclude=`` (no commas: lm-eval splits model_args on them): a block's layers, or a
    layer by its whole name (also, with blocks, a layer outside any block, such as lm_head)."""
    def one(unit: str) -> str:
        block = _BLOCK.match(unit + ".") if granularity == "block" else None
        return re.escape(unit) + (r"\." if block is not None and block[1] == unit else "$")

    return "^(?:" + "|".join(one(u) for u in units) + ")"


SENSITIVITY = ("block", "layer")


DEFAULT_TOP_K = 3


def check_args(*, max_length: int, batch_size: int, max_tokens: int | None, sensitivity: str | None,
               top_k: int | None) -> None:
    """Refuse, before any model work, arguments that would fail late or mean something odd.

    (``top_k=0`` would print ``exclude=^(?:)``, a pattern that keeps every layer in high precision.)
    """
    if max_length < 2:
        raise ValueError(f"--max_length must be >= 2 (a sequence predicts its tokens after the first), got {max_length}")
    if batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"--max_tokens must be >= 2, got {max_tokens}")
    if sensitivity is not None and sensitivity not in SENSITIVITY:
        raise ValueError(f"--sensitivity must be one of {', '.join(SENSITIVITY)}, got {sensitivity!r}")
    if top_k is not None:
        if sensitivity is None:
            raise ValueError("--top_k sets how many units --sensitivity's exclude pattern keeps: it needs --sensitivity")
        if top_k < 1:
            raise ValueError(f"--top_k must be >= 1 (the exclude pattern keeps the worst top_k), got {top_k}")


def run_divergence(
    model: nn.Module,
    tokenizer: Any,
    texts: Iterable[str],
    config: MXConfig,
    *,
    max_length: int = 256,
    batch_size: int = 4,
    max_tokens: int | None = None,
    sensitivity: str | None = None,
    top_k: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Apply ``config`` to ``model`` (keeping originals) and measure divergence; returns a JSON-able dict.

    ``top_k`` (with ``sensitivity``; default 3) must leave at least one unit in MX.
    """
    from tqdm.auto import tqdm

    check_args(max_length=max_length, batch_size=batch_size, max_tokens=max_tokens,
               sensitivity=sensitivity, top_k=top_k)
    top_k = DEFAULT_TOP_K if top_k is None else top_k
    device = next(model.parameters()).device
    batches = token_batches(tokenizer, texts, max_length, batch_size, max_tokens)
    if not batches:
        raise ValueError("divergence: the corpus gave no token sequence longer than one token")
    report = apply_mx(model, config, keep_original=True)
    stats, sqnr = TokenStats(), _SQNR()
    units = units_of(model, sensitivity) if sensitivity else {}
    if sensitivity and top_k >= len(units):
        raise ValueError(f"--top_k {top_k}: the model has {len(units)} MX {sensitivity}s, so the exclude pattern "
                         f"would keep all of them in high precision; use --top_k below {len(units)}")
    unit_kl: dict[str, float] = defaultdict(float)
    for batch in tqdm(batches, desc="divergence", unit="batch", disable=not progress):
        with mx_disabled(model):
            lb, targets = _logprobs(model, batch, device)
        handles = sqnr.hooks(model)
        try:
            lm, _ = _logprobs(model, batch, device)
        finally:
            for h in handles:
                h.remove()
        stats.add(lb, lm, targets)
        for unit, names in units.items():
            with mx_only(model, names):
                unit_kl[unit] += kl_sum(lb, _logprobs(model, batch, device)[0])
    out: dict[str, Any] = {
        "config": config.to_dict(),
        "label": config.label(),
        "replaced_layers": len(report.replaced),
        "metrics": stats.summary(),
        "sqnr_db": worst_first(sqnr.db(), higher_is_worse=False),
    }
    rotated = [(n, m) for n, m in mx_layers(model) if m.mx_spec.rotation is not None]
    if rotated:
        out["sqnr_db_unrotated"] = _sqnr_without_rotation(model, rotated, batches, device)
    if sensitivity:
        n = max(stats.tokens, 1)
        ranking = worst_first({u: kl / n for u, kl in unit_kl.items()}, higher_is_worse=True)
        worst = list(ranking)[:top_k]
        out["sensitivity"] = {"granularity": sensitivity, "kl_alone": ranking, "worst": worst,
                              "exclude": exclude_pattern(worst, sensitivity)}
    return out


def _sqnr_without_rotation(model: nn.Module, rotated: list[tuple[str, MXLayer]], batches: list[torch.Tensor],
                           device: torch.device) -> dict[str, float]:
    """Each rotated layer's output SQNR with the same scheme but no rotation, on the same inputs (one more pass
    over the corpus; the rotated weights are put back afterwards)."""
    saved = []
    for _, m in rotated:
        saved.append((m, m.mx_spec, {n: getattr(m, f"_mx_{n}") for n in m.mx_prequantized}))
        set_spec(m, dataclasses.replace(m.mx_spec, rotation=None))
    sqnr = _SQNR()
    try:
        for batch in batches:
            handles = sqnr.hooks(model)
            try:
                _logprobs(model, batch, device)
            finally:
                for h in handles:
                    h.remove()
    finally:
        for m, spec, weights in saved:
            set_spec(m, spec, weights)
    names = {n for n, _ in rotated}
    return {n: db for n, db in sqnr.db().items() if n in names}

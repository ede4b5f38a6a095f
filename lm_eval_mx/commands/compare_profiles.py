"""``lm-eval-mx compare --profile A --profile B ...``: each stack's numerics on the same model or checkpoint, and
how often their top-1 tokens agree on the corpus (how much of an accuracy gap is the stack, not the format).

Each ``--profile`` is combined with each ``--config`` (which names the format) and each ``--checkpoint``; a
combination the stack does not run is listed with the stack's reason and left out, never dropped silently.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..numerics.profiles import ProfileRefusal, get_profile

# Corpus tokens the agreement is measured on (the shipped corpus, tasks/corpus), and how they are cut.
AGREEMENT_MAX_LENGTH = 128
AGREEMENT_BATCH = 4


def profile_specs(profiles: list[str], specs: list[tuple[str, dict[str, Any]]]
                  ) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
    """(source, MX args) of every profile x ``--config`` the stack runs, and one line per combination it refuses
    (with the stack's reason); ``ValueError`` for an unknown profile or a ``--config`` that sets one itself."""
    from ..selection.config import parse_mx_args

    names = [get_profile(p).name for p in profiles]
    out, refused = [], []
    for source, spec in specs:
        if "profile" in spec:
            raise ValueError(f"{source} sets profile= itself; give profiles with --profile only")
        for name in names:
            args = {**spec, "profile": name}
            try:
                parse_mx_args(args)
            except ProfileRefusal as e:
                refused.append(f"--profile {name} with {source}: {e}")
                continue
            except ValueError as e:
                raise ValueError(f"--profile {name} with {source}: {e}") from None
            out.append((f"--profile {name} with {source}", args))
    return out, refused


def profile_checkpoints(profiles: list[str], checkpoints: list[tuple[str, str]], base_args: dict[str, Any]
                        ) -> tuple[list[tuple[str, str]], dict[str, dict[str, Any]], list[str]]:
    """Each checkpoint as hf-mx reads it (its recipe as stored), then every (checkpoint, profile) the stack runs,
    as ((label, directory), model_args by label), and one line per combination the stack refuses, with its reason
    (checked before any model loads)."""
    from ..hf.model import HFMXLM
    from .compare import checkpoint_args

    out, extra, refused = [], {}, []
    for label, path in checkpoints:
        out.append((label, path))
        for name in (get_profile(p).name for p in profiles):
            run = f"{name}: {label}"
            try:
                HFMXLM.check_before_loading(**checkpoint_args(base_args, path), profile=name)
            except ProfileRefusal as e:
                refused.append(f"--checkpoint {label} with --profile {name}: {e}")
                continue
            except ValueError as e:
                raise ValueError(f"--checkpoint {label} with --profile {name}: {e}") from None
            out.append((run, path))
            extra[run] = {"profile": name}
    return out, extra, refused


def agreement_batches(tokenizer: Any, max_tokens: int) -> list[Any]:
    """Token batches of the shipped corpus (tasks/corpus), at most ``max_tokens`` tokens."""
    from ..algorithms.corpus import read_corpus, token_batches

    return token_batches(tokenizer, read_corpus(None), AGREEMENT_MAX_LENGTH, AGREEMENT_BATCH, max_tokens)


def render_agreement(table: dict[str, dict[str, float]], tokens: int) -> Any:
    """A rich table: top-1 agreement (%) of every pair of runs on the corpus tokens."""
    from rich.markup import escape
    from rich.table import Table

    labels = list(table)
    t = Table(title=f"top-1 agreement on {tokens} corpus tokens (%)")
    t.add_column("")
    for i, _ in enumerate(labels):
        t.add_column(f"[{i}]", justify="right")
    for i, a in enumerate(labels):
        t.add_row(escape(f"[{i}] {a}"), *(_pct(table[a][b]) for b in labels))
    return t


def _pct(x: float) -> str:
    return "NaN" if x != x else f"{100 * x:.1f}"


def write_agreement(out: Path, table: dict[str, dict[str, float]], tokens: int, refused: list[str],
                    profiles: dict[str, Any]) -> Path:
    """agreement.json: the matrix, the token count, each run's profile (name, version, source) and the refusals."""
    path = out / "agreement.json"
    path.write_text(json.dumps({"tokens": tokens, "top1_agreement": table, "profiles": profiles, "refused": refused},
                               indent=2, default=str))
    return path

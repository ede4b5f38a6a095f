"""``lm-eval-mx divergence``: check the inputs, load the model once, measure, print.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any


def _f(x: float, spec: str) -> str:
    """A number as ``spec`` formats it, NaN written NaN (Python writes nan)."""
    if math.isnan(x):
        return "NaN"
    return format(x, spec.rstrip("%")) + "%" * spec.endswith("%")


def render(result: dict[str, Any], top: int = 10) -> Any:
    """Rich renderables: the metrics table, the worst layers by SQNR, the sensitivity ranking."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    m = result["metrics"]
    t = Table(title=f"Divergence: {result['label']} ({result['replaced_layers']} MX layers, {m['tokens']} tokens)")
    for col in ("", "baseline", "MX", "Δ"):
        t.add_column(col, justify="right")
    for key, name in (("ce", "cross-entropy (nats)"), ("ppl", "perplexity"), ("entropy", "entropy (nats)")):
        b, x = m[f"{key}_base"], m[f"{key}_mx"]
        t.add_row(name, _f(b, ".4f"), _f(x, ".4f"), _f(x - b, "+.4f"))
    t.add_row("KL(baseline ‖ MX)", "", _f(m["kl_base_mx"], ".5f"), "")
    t.add_row("top-1 agreement", "", _f(100 * m["top1_agreement"], ".2f%"), "")
    parts: list[Any] = [t]
    if m.get("nonfinite_tokens"):
        parts.append(Text(f"{m['nonfinite_tokens']} of {m['tokens']} predicted tokens have a NaN distribution in MX "
                          "(NaN: no top-1, no cross-entropy)"))
    s = Table(title=f"Lowest output SQNR (of {len(result['sqnr_db'])} MX layers)")
    s.add_column("layer")
    s.add_column("SQNR dB", justify="right")
    unrotated = result.get("sqnr_db_unrotated")
    if unrotated:
        s.add_column("without rotation", justify="right")
    for name, db in list(result["sqnr_db"].items())[:top]:
        extra = [_f(unrotated[name], ".2f") if name in unrotated else "-"] if unrotated else []
        s.add_row(name, _f(db, ".2f"), *extra)
    parts.append(s)
    if "sensitivity" in result:
        sens = result["sensitivity"]
        r = Table(title=f"KL added by each {sens['granularity']} alone in MX")
        r.add_column(sens["granularity"])
        r.add_column("KL", justify="right")
        for unit, kl in list(sens["kl_alone"].items())[:top]:
            r.add_row(unit, _f(kl, ".5f"))
        parts += [r, Text(f"keep the worst {len(sens['worst'])} in high precision: exclude={sens['exclude']}")]
        nan = [u for u, kl in sens["kl_alone"].items() if math.isnan(kl)]
        if len(nan) > len(sens["worst"]):
            parts.append(Text(f"{len(nan)} {sens['granularity']}s make the output NaN alone in MX; the exclude pattern "
                              f"keeps only {len(sens['worst'])} of them (raise --top_k to {len(nan)} or more)"))
    return Group(*parts)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "divergence",
        help="token-level CE/perplexity/entropy, KL(baseline||MX), top-1 agreement and per-layer SQNR",
        description="How far one MX configuration moves the model's predictions, on one model copy.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  lm-eval-mx divergence --model_args pretrained=PATH --config format=fp4_e2m1,mlp_only=True\n"
            "  lm-eval-mx divergence --model_args pretrained=PATH --config format=fp4 --sensitivity block --top_k 4\n"
            "The corpus defaults to the public-domain texts shipped in tasks/corpus."
        ),
    )
    p.add_argument("--model_args", required=True, help="hf model args without MX keys, e.g. pretrained=PATH,dtype=bfloat16")
    p.add_argument("--config", required=True, metavar="MX_ARGS", help="the MX configuration, e.g. format=fp4,mlp_only=True")
    p.add_argument("--corpus", nargs="+", default=None, metavar="TXT", help="text files (default: tasks/corpus/*.txt)")
    p.add_argument("--max_length", type=int, default=256, help="tokens per sequence, >= 2 (default 256)")
    p.add_argument("--max_tokens", type=int, default=None, help="stop after this many corpus tokens (>= 2)")
    p.add_argument("--batch_size", type=int, default=4, help="sequences per forward, >= 1 (default 4)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:0 ... (default: cuda if available, else cpu)")
    p.add_argument("--sensitivity", choices=("block", "layer"), default=None,
                   help="also rank blocks/layers by the KL each adds alone in MX (one extra forward per unit)")
    p.add_argument("--top_k", type=int, default=None,
                   help="with --sensitivity: how many of the worst units the exclude pattern keeps in high "
                        "precision (>= 1 and fewer than the units; default 3)")
    p.add_argument("--output", default=None, metavar="JSON", help="write the full result here")


def main(ns: argparse.Namespace) -> int:
    """Check every input, load the model once, measure, print (and write --output)."""
    import json

    from rich.console import Console

    from ..algorithms.corpus import read_corpus
    from ..algorithms.divergence import check_args, run_divergence
    from .args import check_writable_dir, parse_config, parse_kv, parse_model_args, resolve_device

    try:
        base = parse_model_args(ns.model_args, "--config")
        source = f"--config {ns.config!r}"
        config = parse_config(source, parse_kv(ns.config, source))
        if config.packed:
            raise ValueError("divergence compares MX with the same model's high-precision weights: packed=True "
                             "keeps only the MX codes; measure the same configuration without packed")
        if not config.enabled:
            raise ValueError(f"{source} puts nothing in MX, so there is no divergence to measure; "
                             "select layers (roles=..., include=...) or attn_bmm=True")
        check_args(max_length=ns.max_length, batch_size=ns.batch_size, max_tokens=ns.max_tokens,
                   sensitivity=ns.sensitivity, top_k=ns.top_k)
        texts = read_corpus(ns.corpus)
        if ns.output and (Path(ns.output).is_dir() or not Path(ns.output).parent.is_dir()):
            raise ValueError(f"--output {ns.output}: not a file in an existing directory")
        if ns.output:
            check_writable_dir(Path(ns.output).parent, f"--output {ns.output}: its directory")
        base["device"] = resolve_device(ns.device, base)
        from ..hf.model import HFMXLM, check_hf_args

        check_hf_args(config, base)
    except ValueError as e:
        raise SystemExit(f"lm-eval-mx divergence: {e}") from None

    lm = HFMXLM(**base, roles="none", mx_keep_original=True)
    try:
        result = run_divergence(lm.model, lm.tokenizer, texts, config, max_length=ns.max_length,
                                batch_size=ns.batch_size, max_tokens=ns.max_tokens, sensitivity=ns.sensitivity,
                                top_k=ns.top_k)
    except ValueError as e:  # inputs that only the loaded model can judge (corpus too short, top_k vs units)
        raise SystemExit(f"lm-eval-mx divergence: {e}") from None
    Console(width=160).print(render(result))
    if ns.output:
        Path(ns.output).write_text(json.dumps(result, indent=2))
    return 0

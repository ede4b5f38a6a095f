"""``lm-eval-mx``: lm-eval's CLI with hf-mx and the offline tasks loaded, plus the MX commands (one module each in this package).

    lm-eval-mx run --model hf-mx --model_args pretrained=PATH,mlp_only=True --tasks T
    lm-eval-mx compare --model_args pretrained=PATH --tasks T --config format=fp8 --config format=fp4,mlp_only=True
    lm-eval-mx compare --sweep "format=fp8_e4m3,fp4_e2m1 roles=mlp,all" ...
    lm-eval-mx compare --results base.json mx.json          (tabulate existing results files)
    lm-eval-mx divergence --model_args pretrained=PATH --config format=fp4 --sensitivity block
    lm-eval-mx search --model_args pretrained=PATH --candidates fp4_e2m1,fp8_e4m3,bf16 --bits 6   (writes recipe.json)
    lm-eval-mx quantize --model_args pretrained=PATH,format=mxfp4 --method gptq --calibration FILES --output DIR
    lm-eval-mx formats                                      (the MX element formats)
    lm-eval-mx demo                                         (baseline vs MX on SmolLM2-135M, offline)
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .. import __version__
from ..hf.tasks import tasks_dir
from . import compare, demo, divergence, quantize, search


def with_offline_tasks() -> None:
    """Make lm-eval's ``TaskManager`` index lm-eval-mx's ``tasks/`` besides any ``include_path`` (lm-eval's
    ``--include_path`` holds one directory, so a user's would otherwise replace ours)."""
    import lm_eval.tasks

    base = lm_eval.tasks.TaskManager
    if getattr(base, "_lm_eval_mx_tasks", False):
        return

    class TaskManager(base):  # type: ignore[misc,valid-type]
        _lm_eval_mx_tasks = True

        def __init__(self, verbosity: Any = None, include_path: Any = None, *args: Any, **kwargs: Any) -> None:
            paths = [] if include_path is None else list(include_path) if isinstance(include_path, (list, tuple)) \
                else [include_path]
            ours = str(tasks_dir())
            if ours not in map(str, paths):
                paths.insert(0, ours)  # first: lm-eval lets later paths override earlier ones
            super().__init__(verbosity, paths, *args, **kwargs)

    lm_eval.tasks.TaskManager = TaskManager  # type: ignore[misc]


def run_lm_eval(argv: list[str]) -> None:
    """lm-eval's own CLI, with hf-mx registered and ``--include_path`` pointing at our tasks."""
    import lm_eval.models  # noqa: F401  (the autoload hook registers hf-mx here)
    from lm_eval.__main__ import cli_evaluate

    from .._autoload import register

    register()
    if any(a in ("--include_path", "--include-path") or a.startswith(("--include_path=", "--include-path="))
           for a in argv):
        extra: list[str] = []  # lm-eval takes one directory: ours is added to every TaskManager instead
        with_offline_tasks()
    else:
        extra = ["--include_path", str(tasks_dir())]
    subcommands = ("run", "ls", "validate")
    if argv and argv[0] in subcommands:
        sys.argv = ["lm-eval", argv[0], *argv[1:], *(extra if argv[0] != "validate" else [])]
    else:
        sys.argv = ["lm-eval", "run", *argv, *extra]
    try:
        cli_evaluate()
    except ValueError as e:  # bad input (model_args, a checkpoint, a task): one line, no traceback
        raise SystemExit(f"lm-eval-mx {argv[0] if argv and argv[0] in subcommands else 'run'}: "
                         f"{(str(e).strip().splitlines() or [type(e).__name__])[0]}") from None


def formats_main() -> int:
    from rich.console import Console
    from rich.table import Table

    from ..numerics.formats import ALIASES, FIXED_SCHEMES, FORMATS, NAMED_SCHEMES

    console = Console(width=160)
    t = Table(title="Element formats (w_format=, a_format=, format=, role_formats=, ...)")
    for col in ("name", "bits", "exp bits", "mantissa bits", "emax", "max normal", "min subnormal", "aliases"):
        t.add_column(col)
    for f in FORMATS.values():
        aliases = ", ".join(a for a, n in ALIASES.items() if n == f.name)
        t.add_row(f.name, str(f.bits), str(f.ebits), str(f.mbits), str(f.emax), f"{f.max_normal:g}",
                  f"{f.min_subnormal:g}", aliases)
    console.print(t)
    s = Table(title="Schemes: bits per element include the block scales (the per-tensor scale's 32 bits are left out)")
    for col in ("name", "element", "block", "block scale", "tensor scale", "bits/element", "fixed?"):
        s.add_column(col)
    for name, scheme in NAMED_SCHEMES.items():
        fixed = "yes: block and scales fixed" if name in FIXED_SCHEMES else "no: block_size, scale_* keys apply"
        s.add_row(name, scheme.elem.name, str(scheme.block_size), scheme.scale_format.value.upper(),
                  scheme.tensor_scale.value, f"{scheme.bits():g}", fixed)
    console.print(s)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``lm-eval-mx``'s own subcommands (``run``, ``ls`` and ``validate`` go to lm-eval's CLI)."""
    parser = argparse.ArgumentParser(
        prog="lm-eval-mx",
        description="Evaluate language models with MX (OCP Microscaling) matmuls in lm-evaluation-harness.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "Any other arguments go to lm-eval's own CLI with hf-mx and the offline tasks loaded:\n"
            "  lm-eval-mx run --model hf-mx --model_args pretrained=PATH,mlp_only=True --tasks piqa_offline\n"
            "  lm-eval-mx --model hf-mx --model_args pretrained=PATH,format=fp4 --tasks mx_corpus_ppl"
        ),
    )
    parser.add_argument("--version", action="version", version=f"lm-eval-mx {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{compare,divergence,search,quantize,formats,demo,run,ls,validate}")
    compare.add_parser(sub)
    divergence.add_parser(sub)
    search.add_parser(sub)
    quantize.add_parser(sub)
    sub.add_parser("formats", help="list the element formats, their aliases and the named schemes (mxfp4, nvfp4, ...)")
    sub.add_parser("demo", help="baseline vs MXFP8 vs MXFP4 on SmolLM2-135M, offline, on CPU (make demo)", add_help=False)
    sub.add_parser("run", help="lm-eval's run command (hf-mx and offline tasks loaded)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help", "--version"):
        parser.parse_args(argv or ["--help"])
        return 0
    if argv[0] == "compare":
        return compare.main(parser.parse_args(argv))
    if argv[0] == "divergence":
        return divergence.main(parser.parse_args(argv))
    if argv[0] == "search":
        return search.main(parser.parse_args(argv))
    if argv[0] == "quantize":
        return quantize.main(parser.parse_args(argv))
    if argv[0] == "demo":
        return demo.main(argv[1:])
    if argv[0] == "formats":
        return formats_main()
    run_lm_eval(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())

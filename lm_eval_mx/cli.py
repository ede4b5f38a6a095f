"""``lm-eval-mx``: lm-eval's CLI with hf-mx and the offline tasks loaded, plus ``compare``.

    lm-eval-mx run --model hf-mx --model_args pretrained=PATH,mlp_only=True --tasks T
    lm-eval-mx compare --model_args pretrained=PATH --tasks T --config format=fp8 --config format=fp4,mlp_only=True
    lm-eval-mx compare --sweep "format=fp8_e4m3,fp4_e2m1 roles=mlp,all" ...
    lm-eval-mx compare --results base.json mx.json          (tabulate existing results files)
    lm-eval-mx divergence --model_args pretrained=PATH --config format=fp4 --sensitivity block
    lm-eval-mx search --model_args pretrained=PATH --candidates fp4_e2m1,fp8_e4m3,bf16 --bits 6   (writes recipe.json)
    lm-eval-mx formats                                      (the MX element formats)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__, search


def tasks_dir() -> Path:
    """The offline task YAMLs: inside the installed package, or ``tasks/`` of a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "tasks", here.parent / "tasks"):
        if (candidate / "utils.py").exists():
            return candidate
    raise FileNotFoundError("lm-eval-mx's tasks/ directory is missing from this installation")


def run_lm_eval(argv: list[str]) -> None:
    """lm-eval's own CLI, with hf-mx registered and ``--include_path`` pointing at our tasks."""
    import lm_eval.models  # noqa: F401  (the autoload hook registers hf-mx here)
    from lm_eval.__main__ import cli_evaluate

    from ._autoload import register

    register()
    if any(a in ("--include_path", "--include-path") or a.startswith("--include_path=") for a in argv):
        extra: list[str] = []
    else:
        extra = ["--include_path", str(tasks_dir())]
    subcommands = ("run", "ls", "validate")
    if argv and argv[0] in subcommands:
        sys.argv = ["lm-eval", argv[0], *argv[1:], *(extra if argv[0] != "validate" else [])]
    else:
        sys.argv = ["lm-eval", "run", *argv, *extra]
    cli_evaluate()


def _compare_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="evaluate a baseline and MX configurations of one model on the same tasks, and tabulate Δ",
        description="Baseline vs MX on the same tasks, batch size and seed; the model is loaded once.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  lm-eval-mx compare --model_args pretrained=PATH,dtype=bfloat16 --tasks hellaswag_offline \\\n"
            "      --config format=fp8_e4m3 --config format=fp4_e2m1,mlp_only=True --limit 200\n"
            "  lm-eval-mx compare --model_args pretrained=PATH --tasks mx_corpus_ppl \\\n"
            "      --sweep 'format=fp8_e4m3,fp4_e2m1 block_size=32,16 roles=mlp,all'\n"
            "  lm-eval-mx compare --results baseline.json mxfp4.json"
        ),
    )
    p.add_argument("--model_args", default="", help="hf model args without MX keys, e.g. pretrained=PATH,dtype=bfloat16")
    p.add_argument("--tasks", default="", help="comma-separated lm-eval task names (offline tasks are included)")
    p.add_argument("--config", action="append", default=[], metavar="MX_ARGS",
                   help="one MX configuration in model_args syntax (repeatable), e.g. format=fp4,mlp_only=True")
    p.add_argument("--sweep", default=None, help="grid of MX configurations: 'key=v1,v2 key2=v3,v4'")
    p.add_argument("--results", nargs="+", default=None, metavar="JSON",
                   help="tabulate existing lm-eval results files instead of running (first = baseline)")
    p.add_argument("--limit", type=float, default=None, help="examples per task (integer >= 1) or a fraction in (0, 1)")
    p.add_argument("--num_fewshot", type=int, default=None)
    p.add_argument("--batch_size", default=None, help="integer >= 1, auto or auto:N (default 1)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:0 ... (default: cuda if available, else cpu)")
    p.add_argument("--seed", type=int, default=None, help="lm-eval's seeds (default 1234)")
    p.add_argument("--include_path", default=None, help="extra task directory (lm-eval-mx's tasks/ is always included)")
    p.add_argument("--output_dir", default="mx_compare", help="where compare.md/.csv/.json/.png go (default: mx_compare)")


def _divergence_parser(sub: argparse._SubParsersAction) -> None:
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


def divergence_main(ns: argparse.Namespace) -> int:
    """Check every input, load the model once, measure, print (and write --output)."""
    import json

    from rich.console import Console

    from .compare import parse_config, parse_kv, parse_model_args, resolve_device
    from .divergence import check_args, read_corpus, render, run_divergence

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
        base["device"] = resolve_device(ns.device, base)
        from .model import HFMXLM, check_hf_args

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


def compare_main(ns: argparse.Namespace) -> int:
    """Tabulate --results files, or run the baseline and every configuration; inputs are checked first."""
    from rich.console import Console

    from . import compare as cmp

    console = Console(width=160)
    out = Path(ns.output_dir)
    try:
        if out.exists() and not out.is_dir():
            raise ValueError(f"--output_dir {out} is a file, not a directory")
        if ns.results:
            given = [f for f in ("model_args", "tasks", "config", "sweep", "limit", "num_fewshot", "batch_size",
                                 "device", "seed", "include_path") if getattr(ns, f) not in (None, "", [])]
            if given:
                raise ValueError(f"--results tabulates existing files; --{', --'.join(given)} would be ignored")
            if len(ns.results) < 2:
                raise ValueError("--results needs a baseline file and at least one MX file")
            runs = [cmp.load_results(p) for p in ns.results]
            labels = cmp.unique_labels([r.label for r in runs], list(ns.results))
            for r, label in zip(runs, labels):
                r.label = label
        else:
            if not ns.tasks:
                raise ValueError("--tasks is required (or --results FILES)")
            base = cmp.parse_model_args(ns.model_args, "--config/--sweep")
            specs = [(f"--config {c!r}", cmp.parse_kv(c, f"--config {c!r}")) for c in ns.config]
            if ns.sweep:
                points = cmp.expand_sweep(ns.sweep)
                specs += [(f"--sweep point {' '.join(f'{k}={v}' for k, v in p.items())!r}", p) for p in points]
            if not specs:
                raise ValueError("give at least one --config or a --sweep")
            configs = cmp.plan_configs(specs)
            cmp.check_against_model_args(base, configs)
            limit, batch = cmp.check_run_args(ns.limit, ns.batch_size or "1", ns.num_fewshot)
            if ns.include_path is not None and not Path(ns.include_path).is_dir():
                raise ValueError(f"--include_path {ns.include_path}: no such directory")
            device = cmp.resolve_device(ns.device, base)
            include = [str(tasks_dir())] + ([ns.include_path] if ns.include_path else [])
            tasks = [t for t in ns.tasks.split(",") if t]
            task_manager = cmp.task_manager_for(tasks, include)
            cmp.check_tasks(tasks, task_manager)
    except ValueError as e:
        raise SystemExit(f"lm-eval-mx compare: {e}") from None
    if not ns.results:
        from .selection import SelectionError

        try:
            runs = cmp.run_configs(base, configs, tasks, limit=limit, num_fewshot=ns.num_fewshot, batch_size=batch,
                                   device=device, seed=1234 if ns.seed is None else ns.seed,
                                   task_manager=task_manager)
        except SelectionError as e:  # checked on the loaded model, before any evaluation
            raise SystemExit(f"lm-eval-mx compare: {e}") from None
        if not runs:  # non-zero rank
            return 0
    labels = [r.label for r in runs[1:]]
    rows = cmp.build_rows(runs[0], runs[1:])
    console.print(cmp.rich_table(rows, labels))
    if not ns.results:
        import json

        out.mkdir(parents=True, exist_ok=True)
        for i, r in enumerate(runs):
            (out / f"results_{i:02d}.json").write_text(json.dumps(r.results, indent=2, default=str))
    paths = cmp.write_outputs(runs, out)
    console.print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def formats_main() -> int:
    from rich.console import Console
    from rich.table import Table

    from .formats import ALIASES, FIXED_SCHEMES, FORMATS, NAMED_SCHEMES

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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
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
    sub = parser.add_subparsers(dest="command", metavar="{compare,divergence,search,formats,run,ls,validate}")
    _compare_parser(sub)
    _divergence_parser(sub)
    search.add_parser(sub)
    sub.add_parser("formats", help="list the element formats, their aliases and the named schemes (mxfp4, nvfp4, ...)")
    sub.add_parser("run", help="lm-eval's run command (hf-mx and offline tasks loaded)", add_help=False)
    if not argv or argv[0] in ("-h", "--help", "--version"):
        parser.parse_args(argv or ["--help"])
        return 0
    if argv[0] == "compare":
        return compare_main(parser.parse_args(argv))
    if argv[0] == "divergence":
        return divergence_main(parser.parse_args(argv))
    if argv[0] == "search":
        return search.main(parser.parse_args(argv))
    if argv[0] == "formats":
        return formats_main()
    run_lm_eval(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``lm-eval-mx compare``: baseline vs MX configurations of one model on the same tasks, one table.

The model is loaded once; MX is applied, evaluated and removed per configuration
on the same copy (``HFMXLM.set_mx``), so every run sees identical weights,
batches and seeds.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..hf.tasks import tasks_dir
from ..selection.config import SCHEME_KEYS, MXConfig, _as_bool, parse_mx_args
from .args import (
    check_run_args,
    check_tasks,
    check_writable_dir,
    error_line,
    parse_config,
    parse_kv,
    parse_model_args,
    resolve_device,
    task_manager_for,
)
from .compare_profiles import (
    agreement_batches,
    profile_checkpoints,
    profile_specs,
    render_agreement,
    write_agreement,
)
from .results_table import Run, build_rows, load_results, rich_table, unique_labels, write_outputs


class CompareError(ValueError):
    """An input found bad once the run started (a checkpoint that does not load), before any evaluation."""


def expand_sweep(spec: str) -> list[dict[str, Any]]:
    """``"format=fp8,fp4 block_size=32,16 roles=mlp,all"`` -> the 8 combinations, as model_args dicts.

    Keys are separated by spaces or ';', alternatives by ','; a value that is
    itself a list uses '|' (``roles=mlp_up|mlp_down,all``). Values are typed as ``--config``'s are
    (lm-eval's model_args parsing: ``block_size=32.0`` is the number 32 in both).
    """
    axes: list[tuple[str, list[str]]] = []
    for part in spec.replace(";", " ").split():
        key, sep, values = part.partition("=")
        alts = [v for v in values.split(",") if v]
        if not sep or not key or not alts:
            raise ValueError(f"sweep: expected key=v1,v2,... but got {part!r}")
        if key in dict(axes):  # a dict of the grid would keep only the last
            raise ValueError(f"sweep: key {key!r} given twice in {spec!r}; list its values once: {key}=v1,v2")
        axes.append((key, alts))
    if not axes:
        raise ValueError("--sweep is empty: give key=v1,v2 ... (e.g. 'format=fp8,fp4 roles=mlp,all'), or leave it out")
    typed = [(key, [parse_kv(f"{key}={v}", f"sweep {key}={v}")[key] for v in alts]) for key, alts in axes]
    combos = [dict(zip([k for k, _ in typed], values)) for values in itertools.product(*(v for _, v in typed))]
    for c in combos:
        parse_mx_args(c)  # validate every point of the grid before any run
    return combos


def _shown(value: Any) -> str:
    """A typed model_args value as the user wrote it (lm-eval reads the word none as None)."""
    return "none" if value is None else str(value)


def plan_configs(specs: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, MXConfig]]:
    """(label, MXConfig) per (source, MX args), checked by :func:`check_configs`, with unique labels."""
    parsed = [(source, parse_config(source, spec)) for source, spec in specs]
    check_configs(parsed)
    details = [",".join(f"{k}={_shown(v)}" for k, v in spec.items()) for _, spec in specs]
    return list(zip(unique_labels([c.label() for _, c in parsed], details), [c for _, c in parsed]))


def check_configs(configs: list[tuple[str, MXConfig]]) -> None:
    """Each (source, config) puts something in MX (the baseline is always run) and none comes twice."""
    for i, (source, cfg) in enumerate(configs):
        if not cfg.enabled:
            raise ValueError(f"{source} puts nothing in MX: that is the baseline, which compare always runs")
        same = next((s for s, c in configs[:i] if behaviour(c) == behaviour(cfg)), None)
        if same is not None:
            raise ValueError(f"{same} and {source} are the same MX configuration ({cfg.label()}), however written: "
                             "give it once")


def behaviour(cfg: MXConfig) -> dict[str, Any]:
    """What a configuration does, independent of how it was written: the selected roles as a set, the
    resolved scheme of every format in use (so ``scale_format=e8m0``, ``block_size=32`` or
    ``scale_mode=floor`` spelled out equal their defaults, and keys a fixed scheme ignores drop out), and
    ``a_format`` only where activations are quantized."""
    d = cfg.to_dict()
    for key in SCHEME_KEYS:
        del d[key]
    d["roles"] = sorted(cfg.roles)
    d["rotation_roles"] = None if cfg.rotation_roles is None else sorted(cfg.rotation_roles)
    d["schemes"] = {name: cfg.scheme(name) for name in cfg.formats_in_use()}
    if not cfg.selects_layers:
        for key in ("w_format", "a_format", "weight_only", "role_formats", "layer_formats", "include", "exclude"):
            d.pop(key)
    elif cfg.weight_only and not (cfg.attn_bmm and cfg.bmm_format is None):
        d.pop("a_format")
    if cfg.attn_bmm:
        d["bmm_format"] = cfg.attn_bmm_format
    if cfg.rotation != "none" and cfg.rotation_block is None:
        sizes = {s.block_size for s in d["schemes"].values()}
        d["rotation_block"] = sizes.pop() if len(sizes) == 1 else None
    return d


def check_against_model_args(base_args: dict[str, Any], configs: list[tuple[str, MXConfig]]) -> None:
    """What each configuration cannot do with these hf arguments on this machine (packed, attn_implementation,
    the backend): ``ValueError`` naming the configuration, before the model loads."""
    from ..hf.model import check_hf_args

    if any(cfg.packed for _, cfg in configs) or _as_bool("packed", base_args.get("packed", False)):
        raise ValueError(
            "compare evaluates every configuration on one high-precision copy, but packed=True loads a model "
            "per configuration: run `lm-eval-mx run --model hf-mx --model_args ...,packed=True` for each "
            "(and the baseline), then `lm-eval-mx compare --results BASELINE.json MX.json ...`"
        )
    for label, cfg in configs:
        try:
            check_hf_args(cfg, base_args)
        except ValueError as e:
            raise ValueError(f"configuration {label!r}: {e}") from None


def run_configs(
    base_args: dict[str, Any],
    configs: list[tuple[str, MXConfig]],
    tasks: list[str],
    *,
    limit: float | None = None,
    num_fewshot: int | None = None,
    batch_size: int | str = 1,
    device: str | None = None,
    seed: int = 1234,
    include_path: str | list[str] | None = None,
    task_manager: Any = None,
    progress: bool = True,
    checkpoints: list[tuple[str, str]] = (),  # type: ignore[assignment]
    checkpoint_extra: dict[str, dict[str, Any]] | None = None,
    after_each: Callable[[str, Any], None] | None = None,
) -> list[Run]:
    """Evaluate the baseline then each MX configuration on one model copy, then each quantized checkpoint
    ((label, directory): a format of :data:`lm_eval_mx.hf.checkpoints.SUPPORTED`) as it is stored,
    with the model_args ``checkpoint_extra`` gives its label (a profile); every argument is checked first, before
    the model loads. ``after_each(label, model)``: called with each run's model as it was evaluated."""
    extra = checkpoint_extra or {}
    check_against_model_args(base_args, configs)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from ..hf.model import HFMXLM
    from ..nn.attention import AttentionError
    from ..selection.apply import SelectionError, check_config

    check_labels([label for label, _ in configs], [label for label, _ in checkpoints])
    check_configs([(f"configuration {label!r}", cfg) for label, cfg in configs])
    limit, batch_size = check_run_args(limit, batch_size, num_fewshot)
    task_manager = task_manager or TaskManager(include_path=include_path)
    check_tasks(tasks, task_manager)
    args = {**base_args, "batch_size": batch_size, "roles": "none", "mx_keep_original": True,
            "device": resolve_device(device, base_args)}
    check_checkpoints(args, checkpoints, extra)
    for label, path in checkpoints:  # what only loading tells (tensors vs config, placement), before any evaluation
        try:
            HFMXLM(**checkpoint_args(args, path), **extra.get(label, {}))
        except (ValueError, OSError, RuntimeError) as e:
            raise CompareError(f"--checkpoint {label}={path} does not load: {error_line(e)}") from None
    lm = HFMXLM(**args)
    for label, cfg in configs:  # what a configuration cannot do on this model fails now, not after the baseline's run
        try:
            check_config(lm.model, cfg)
        except (SelectionError, AttentionError) as e:
            raise SelectionError(f"configuration {label!r}: {e}") from None
    plan = [("baseline", MXConfig(roles=())), *configs]
    runs: list[Run] = []
    from rich.progress import Progress

    def evaluate(model: Any, label: str, cfg: MXConfig) -> None:
        res = simple_evaluate(
            model=model, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=task_manager,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
            bootstrap_iters=1000,
        )
        if res is not None:  # None on non-zero ranks under accelerate
            runs.append(Run(label, cfg.to_dict() if cfg.enabled else None, res))
        if after_each is not None:
            after_each(label, model.model)

    with Progress(disable=not progress or lm.rank != 0) as bar:
        job = bar.add_task("configurations", total=len(plan) + len(checkpoints))
        for label, cfg in plan:
            bar.update(job, description=f"evaluating {label}")
            lm.set_mx(cfg)
            evaluate(lm, label, cfg)
            bar.advance(job)
        lm.set_mx(MXConfig(roles=()))
        for label, path in checkpoints:
            bar.update(job, description=f"evaluating {label}")
            stored = HFMXLM(**checkpoint_args(args, path), **extra.get(label, {}))
            evaluate(stored, label, stored.mx_config)
            del stored
            bar.advance(job)
    return runs


# A checkpoint holds its own weights and configuration: the base model's file options and MX settings stay with it.
_BASE_ONLY = frozenset({"pretrained", "gguf_file", "revision", "subfolder", "tokenizer", "roles", "mx_keep_original"})


def checkpoint_args(base_args: dict[str, Any], path: str) -> dict[str, Any]:
    """hf-mx's arguments for a ``--checkpoint``: the run's (device, dtype, batch size, ...) with its own weights."""
    return {**{k: v for k, v in base_args.items() if k not in _BASE_ONLY}, "pretrained": path}


def check_labels(config_labels: list[str], checkpoint_labels: list[str]) -> None:
    """compare.json is keyed by run labels: each once, and none 'baseline'."""
    labels = ["baseline", *config_labels, *checkpoint_labels]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise ValueError(f"run labels must be unique and not 'baseline' (compare.json is keyed by them): "
                         f"{', '.join(map(repr, twice))} comes twice; name checkpoints with --checkpoint LABEL=DIR")


# Config fields that a quantized copy of the baseline's model shares with it (else the Δ compares two models).
SAME_MODEL_FIELDS = ("model_type", "architectures", "vocab_size", "hidden_size", "num_hidden_layers")


def model_differences(base: dict[str, Any], own: dict[str, Any]) -> list[str]:
    """The SAME_MODEL_FIELDS in which two model configs differ; a field one of them leaves unset (a config read
    from a GGUF file has no ``architectures``) is not a difference."""
    return [f"{k} {own[k]} (baseline {base[k]})" for k in SAME_MODEL_FIELDS
            if base.get(k) is not None and own.get(k) is not None and own[k] != base[k]]


def check_checkpoints(base_args: dict[str, Any], checkpoints: list[tuple[str, str]],
                      extra: dict[str, dict[str, Any]] | None = None) -> None:
    """Every pre-load check of each checkpoint with the run's arguments, and that it is the baseline's model
    (architecture and shapes, from the configs), before anything is evaluated."""
    from ..hf.model import HFMXLM, _read_config

    base = None
    for label, path in checkpoints:
        try:
            HFMXLM.check_before_loading(**checkpoint_args(base_args, path), **(extra or {}).get(label, {}))
            base = base if base is not None else _read_config(base_args).to_dict()
            own = _read_config(checkpoint_args(base_args, path)).to_dict()
        except (ValueError, OSError) as e:
            raise ValueError(f"--checkpoint {label}={path}: {e}") from None
        differ = model_differences(base, own)
        if differ:
            raise ValueError(f"--checkpoint {label}={path} is not a quantized copy of the baseline's model: "
                             f"{'; '.join(differ)}; compare a checkpoint against the model it was made from")


def parse_checkpoints(values: list[str]) -> list[tuple[str, str]]:
    """``--checkpoint [LABEL=]DIR``: (label, directory) of quantized checkpoints hf-mx evaluates as stored (the
    formats of :data:`lm_eval_mx.hf.checkpoints.SUPPORTED`), checked before anything loads (label: the directory's name by default)."""
    from ..hf.model import detect_checkpoint

    out = []
    for value in values:
        label, sep, path = ("", "", value) if Path(value).is_dir() or "=" not in value else value.partition("=")
        label = label if sep else Path(path).name
        if not label or not path:
            raise ValueError(f"--checkpoint {value!r}: give DIR or LABEL=DIR")
        if not (Path(path) / "config.json").is_file():
            raise ValueError(f"--checkpoint {value!r}: {path} is not a model directory (no config.json)")
        if detect_checkpoint({"pretrained": path}) == (None, None):  # raises on a format hf-mx cannot read
            raise ValueError(f"--checkpoint {value!r}: {path} is not quantized (its config.json has no "
                             "quantization_config); evaluate a high-precision model with --model_args and --config")
        out.append((label, path))
    return out


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--checkpoint's help lists the checkpoint readers' formats (:data:`lm_eval_mx.hf.checkpoints.SUPPORTED`),
    imported only when help is shown: building the parser imports no torch."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = super()._get_help_string(action)
        if text and "--checkpoint" in action.option_strings:
            from ..hf.checkpoints import SUPPORTED

            text += ": " + "; ".join(SUPPORTED).replace("%", "%%")
        return text


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="evaluate a baseline and MX configurations of one model on the same tasks, and tabulate Δ",
        description="Baseline vs MX on the same tasks, batch size and seed; the model is loaded once.",
        formatter_class=_HelpFormatter,
        epilog=(
            "examples:\n"
            "  lm-eval-mx compare --model_args pretrained=PATH,dtype=bfloat16 --tasks hellaswag_offline \\\n"
            "      --config format=fp8_e4m3 --config format=fp4_e2m1,mlp_only=True --limit 200\n"
            "  lm-eval-mx compare --model_args pretrained=PATH --tasks mx_corpus_ppl \\\n"
            "      --sweep 'format=fp8_e4m3,fp4_e2m1 block_size=32,16 roles=mlp,all'\n"
            "  lm-eval-mx compare --model_args pretrained=PATH --tasks piqa_offline --config format=mxfp4 \\\n"
            "      --checkpoint gptq=out/gptq-mxfp4 --checkpoint mr-gptq=out/mrgptq-mxfp4\n"
            "  lm-eval-mx compare --results baseline.json mxfp4.json"
        ),
    )
    p.add_argument("--model_args", default="", help="hf model args without MX keys, e.g. pretrained=PATH,dtype=bfloat16")
    p.add_argument("--tasks", default="", help="comma-separated lm-eval task names (offline tasks are included)")
    p.add_argument("--config", action="append", default=[], metavar="MX_ARGS",
                   help="one MX configuration in model_args syntax (repeatable), e.g. format=fp4,mlp_only=True")
    p.add_argument("--sweep", default=None, help="grid of MX configurations: 'key=v1,v2 key2=v3,v4'")
    p.add_argument("--checkpoint", action="append", default=[], metavar="[LABEL=]DIR",
                   help="also evaluate a quantized checkpoint as stored (repeatable; the baseline is --model_args' "
                        "model). Formats")
    p.add_argument("--profile", action="append", default=[], metavar="NAME",
                   help="a stack's numerics (repeatable): each --config (its format) and --checkpoint is run as each "
                        "profile computes it, plus top-1 agreement between the runs on the corpus; profiles: "
                        "ocp, torchao, compressed-tensors, auto-round, quark, vllm-hopper, vllm-blackwell, fp-quant")
    p.add_argument("--agreement_tokens", type=int, default=2048,
                   help="corpus tokens the --profile top-1 agreement is measured on (default 2048)")
    p.add_argument("--results", nargs="+", default=None, metavar="JSON",
                   help="tabulate existing lm-eval results files instead of running (first = baseline)")
    p.add_argument("--limit", type=float, default=None, help="examples per task (integer >= 1) or a fraction in (0, 1)")
    p.add_argument("--num_fewshot", type=int, default=None)
    p.add_argument("--batch_size", default=None, help="integer >= 1, auto or auto:N (default 1)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:0 ... (default: cuda if available, else cpu)")
    p.add_argument("--seed", type=int, default=None, help="lm-eval's seeds (default 1234)")
    p.add_argument("--include_path", default=None, help="extra task directory (lm-eval-mx's tasks/ is always included)")
    p.add_argument("--output_dir", default="mx_compare", help="where compare.md/.csv/.json/.png go (default: mx_compare)")


def main(ns: argparse.Namespace) -> int:
    """Tabulate --results files, or run the baseline and every configuration; inputs are checked first."""
    from rich.console import Console

    console = Console(width=160)
    out = Path(ns.output_dir)
    try:
        check_writable_dir(out, "--output_dir")
        if ns.results:
            given = [f for f in ("model_args", "tasks", "config", "sweep", "checkpoint", "profile", "limit", "num_fewshot",
                                 "batch_size", "device", "seed", "include_path") if getattr(ns, f) not in (None, "", [])]
            if given:
                raise ValueError(f"--results tabulates existing files; --{', --'.join(given)} would be ignored")
            if len(ns.results) < 2:
                raise ValueError("--results needs a baseline file and at least one MX file")
            runs = [load_results(p) for p in ns.results]
            if runs[0].config is not None:
                base = next((p for p, r in zip(ns.results, runs) if r.config is None), None)
                hint = (f"put the baseline first: --results {base} ..." if base is not None else
                        "none of the files is a baseline: evaluate one with nothing in MX (or with lm-eval's hf) "
                        "and put it first")
                raise ValueError(f"--results: the first file is the baseline, but {ns.results[0]} is an MX run "
                                 f"({runs[0].label}, per its mx_config/mx_report); {hint}")
            labels = unique_labels([r.label for r in runs], list(ns.results))
            for r, label in zip(runs, labels):
                r.label = label
        else:
            if not ns.tasks:
                raise ValueError("--tasks is required (or --results FILES)")
            base = parse_model_args(ns.model_args, "--config/--sweep")
            specs = [(f"--config {c!r}", parse_kv(c, f"--config {c!r}")) for c in ns.config]
            if ns.sweep is not None:
                points = expand_sweep(ns.sweep)
                specs += [(f"--sweep point {' '.join(f'{k}={_shown(v)}' for k, v in p.items())!r}", p) for p in points]
            checkpoints = parse_checkpoints(ns.checkpoint)
            if not specs and not checkpoints:
                raise ValueError("give at least one --config, a --sweep or a --checkpoint")
            extra, refused = {}, []
            if ns.profile:
                if ns.sweep is not None:
                    raise ValueError("--profile is combined with each --config; a --sweep is not (give --config's)")
                if ns.agreement_tokens < 2:
                    raise ValueError(f"--agreement_tokens must be >= 2, got {ns.agreement_tokens}")
                specs, refused = profile_specs(ns.profile, specs)
                checkpoints, extra, refused_ckpt = profile_checkpoints(
                    ns.profile, checkpoints, {**base, "device": resolve_device(ns.device, base)})
                refused += refused_ckpt
                if not specs and not checkpoints:
                    raise ValueError("every --profile refuses what it was given:\n  " + "\n  ".join(refused))
            configs = plan_configs(specs) if specs else []
            check_labels([label for label, _ in configs], [label for label, _ in checkpoints])
            check_against_model_args(base, configs)
            limit, batch = check_run_args(ns.limit, ns.batch_size or "1", ns.num_fewshot)
            if ns.include_path is not None and not Path(ns.include_path).is_dir():
                raise ValueError(f"--include_path {ns.include_path}: no such directory")
            device = resolve_device(ns.device, base)
            check_checkpoints({**base, "device": device}, checkpoints, extra)
            include = [str(tasks_dir())] + ([ns.include_path] if ns.include_path else [])
            tasks = [t for t in ns.tasks.split(",") if t]
            task_manager = task_manager_for(tasks, include)
            check_tasks(tasks, task_manager)
    except ValueError as e:
        raise SystemExit(f"lm-eval-mx compare: {e}") from None
    if not ns.results:
        from ..selection.apply import SelectionError

        preds: dict[str, Any] = {}
        after_each = _collect_top1(preds, base, ns.agreement_tokens) if ns.profile else None
        for line in refused:
            console.print(f"refused: {line}")
        try:
            runs = run_configs(base, configs, tasks, limit=limit, num_fewshot=ns.num_fewshot, batch_size=batch,
                               device=device, seed=1234 if ns.seed is None else ns.seed,
                               task_manager=task_manager, checkpoints=checkpoints, checkpoint_extra=extra,
                               after_each=after_each)
        except (SelectionError, CompareError) as e:  # checked on the loaded model, before any evaluation
            raise SystemExit(f"lm-eval-mx compare: {e}") from None
        if not runs:  # non-zero rank
            return 0
    labels = [r.label for r in runs[1:]]
    rows = build_rows(runs[0], runs[1:])
    console.print(rich_table(rows, labels))
    if not ns.results:
        import json

        out.mkdir(parents=True, exist_ok=True)
        for i, r in enumerate(runs):
            (out / f"results_{i:02d}.json").write_text(json.dumps(r.results, indent=2, default=str))
    paths = write_outputs(runs, out)
    if not ns.results and ns.profile:
        from ..algorithms.divergence import agreement

        table = agreement(preds)
        tokens = int(next(iter(preds.values())).numel())
        console.print(render_agreement(table, tokens))
        profiles = {r.label: (r.config or {}).get("profile") for r in runs}
        paths["agreement"] = write_agreement(out, table, tokens, refused, profiles)
    console.print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _collect_top1(preds: dict[str, Any], base: dict[str, Any], max_tokens: int) -> Callable[[str, Any], None]:
    """An ``after_each`` hook: each run's top-1 tokens on the corpus, into ``preds`` by label."""
    from transformers import AutoTokenizer

    from ..algorithms.divergence import top1

    tokenizer = AutoTokenizer.from_pretrained(base.get("tokenizer") or base["pretrained"],
                                              gguf_file=base.get("gguf_file"))
    batches = agreement_batches(tokenizer, max_tokens)

    def hook(label: str, model: Any) -> None:
        preds[label] = top1(model, batches, next(model.parameters()).device)

    return hook

"""``lm-eval-mx quantize``: round the selected weights once (RTN, or GPTQ / MR-GPTQ on calibration text) and save
a packed MX checkpoint that ``AutoModelForCausalLM.from_pretrained`` and ``hf-mx`` load as stored.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .. import __version__
from ..selection.config import RUN_KEYS

# Keys that choose how a checkpoint runs, not what it stores: given when the output loads, not here.
IGNORED_MX_KEYS = ("packed", *RUN_KEYS, "mx_keep_original")
CALIBRATION_DEFAULTS = {"nsamples": 128, "seqlen": 512, "seed": 0}
# lm-eval hf keys of evaluation only (quantize evaluates nothing) or that cannot give high-precision weights to round.
REFUSED_HF_KEYS = {
    **dict.fromkeys(("max_length", "batch_size", "max_batch_size", "truncation", "logits_cache", "softmax_dtype",
                     "add_bos_token", "prefix_token_id", "think_end_token", "enable_thinking", "chat_template_args",
                     "mixed_precision_dtype"), "they shape evaluation, and quantize evaluates nothing (windows are "
                                                "--seqlen tokens)"),
    **dict.fromkeys(("load_in_4bit", "load_in_8bit", "quantization_config", "autogptq", "gptqmodel"),
                    "quantize rounds high-precision weights: the model must load unquantized"),
    **dict.fromkeys(("peft", "delta"), "quantize rounds the base weights: merge the adapter or delta into a "
                                       "checkpoint first"),
}
SAVE_FORMATS = ("mx", "compressed-tensors")
GPTQ_FLAGS = {"block_columns": "--block_columns", "damp": "--damp", "act_order": "--act_order", "scales": "--scales",
              "expert_min_tokens": "--expert_min_tokens"}
DEFAULTS = {"block_columns": 128, "damp": 0.01, "act_order": False, "scales": "static", "expert_min_tokens": None}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="round the selected weights once (GPTQ / MR-GPTQ or RTN) and save a packed MX checkpoint",
        description="Quantize the layers that the MX keys select, with error-compensating rounding (GPTQ; with "
                    "rotation=hadamard, MR-GPTQ) on calibration text, or round to nearest, and save the model as a "
                    "packed MX checkpoint (codes, scales, tokenizer, the MX config and how the codes were made).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  lm-eval-mx quantize --model_args pretrained=PATH,format=mxfp4 --method gptq \\\n"
            "      --calibration tasks/corpus/*.txt --output out/mxfp4-gptq\n"
            "  lm-eval-mx quantize --model_args pretrained=PATH,format=nvfp4,rotation=hadamard --method gptq \\\n"
            "      --calibration piqa_offline --nsamples 128 --seqlen 512 --output out/nvfp4-mrgptq\n"
            "  lm-eval-mx quantize --model_args pretrained=PATH,w_format=fp4,a_format=fp8,roles=mlp --method rtn \\\n"
            "      --output out/mlp-rtn\n"
            "then: lm-eval-mx run --model hf-mx --model_args pretrained=out/mxfp4-gptq --tasks piqa_offline\n"
            "The output loads with AutoModelForCausalLM.from_pretrained(DIR) after `import lm_eval_mx.hf.quantizer`."
        ),
    )
    p.add_argument("--model_args", required=True,
                   help="pretrained=PATH, hf args (dtype=..., trust_remote_code=...) and the MX keys that select "
                        "layers and formats (format=, w_format=, a_format=, roles=, rotation=, ...)")
    p.add_argument("--method", required=True, choices=("gptq", "rtn"),
                   help="gptq: error-compensating rounding on calibration text (MR-GPTQ with rotation=hadamard); "
                        "rtn: round to nearest, what packed=True stores")
    p.add_argument("--output", required=True, metavar="DIR", help="the checkpoint directory to write")
    p.add_argument("--calibration", nargs="+", default=None, metavar="FILES_OR_TASK",
                   help="gptq: UTF-8 text files, or one lm-eval task name (its documents' text + gold continuation)")
    p.add_argument("--nsamples", type=int, default=None, help="gptq: calibration windows (default 128)")
    p.add_argument("--seqlen", type=int, default=None, help="gptq: tokens per window (default 512)")
    p.add_argument("--seed", type=int, default=None, help="gptq: seed of the window draw (default 0)")
    p.add_argument("--block_columns", type=int, default=None, help="gptq: columns per lazy batch update (default 128)")
    p.add_argument("--damp", type=float, default=None, help="gptq: relative damping of diag(H) (default 0.01)")
    p.add_argument("--act_order", action="store_true", default=None,
                   help="gptq: columns in decreasing diag(H) order (static scales only)")
    p.add_argument("--scales", choices=("static", "lazy"), default=None,
                   help="gptq: block scales from the original weight (static, default) or when a block is reached (lazy)")
    p.add_argument("--expert_min_tokens", type=int, default=None,
                   help="gptq: an MoE expert routed fewer calibration tokens is rounded to nearest (recorded per expert; "
                        "default: the weight's input count)")
    p.add_argument("--save_format", choices=SAVE_FORMATS, default="mx",
                   help="mx: this project's packed checkpoint (default); compressed-tensors: llm-compressor's "
                        "nvfp4/mxfp4-pack-quantized files, for transformers + compressed-tensors and vLLM (MXFP4 or NVFP4 "
                        "weights, no rotation; activations none or MXFP4 with scale_mode=even)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:0 ... (default: cuda if available, else cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists (a model directory)")


def _written_by_lm_eval_mx(out: Path) -> bool:
    """Whether a directory is a checkpoint this tool wrote (files only: config.json with ``quant_method: mx``, as
    quantize or a packed model's save_pretrained write, or a ``--save_format compressed-tensors`` output: its
    ``compressed-tensors`` config beside quantize's report), the only kind of directory --overwrite replaces."""
    from ..algorithms.quantize_model import REPORT_FILE

    try:
        config = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return False
    method = (config.get("quantization_config") or {}).get("quant_method") if isinstance(config, dict) else None
    ours = method == "mx" or (method == "compressed-tensors" and (out / REPORT_FILE).is_file())
    return ours and not any(p.is_dir() for p in out.iterdir())


def check_output(path: str, overwrite: bool, inputs: tuple[str, ...] = ()) -> Path:
    """The absolute output directory, checked before any work: not a file, not holding any of ``inputs`` (the
    files and directories the command reads), replaced only when --overwrite is given and it is empty or a packed
    MX checkpoint, and its parent writable (the checkpoint is written beside it first, then renamed)."""
    if not str(path).strip():
        raise ValueError("--output is empty: give the directory to write the checkpoint to")
    out = Path(os.path.abspath(path))  # '.' becomes the working directory, whose parent is a real parent
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {path} is a file, not a directory")
    if out.parent == out:
        raise ValueError(f"--output {path} is the root directory; give a directory of its own")
    if not out.parent.is_dir():
        raise ValueError(f"--output {path}: the parent directory {out.parent} does not exist")
    for given in inputs:
        if given and Path(given).exists():
            src = Path(given).resolve()
            if src == out.resolve() or out.resolve() in src.parents:
                raise ValueError(f"--output {path} holds {given}, an input of this command; write elsewhere")
    if out.exists():
        if not overwrite:
            raise ValueError(f"--output {path} exists; pass --overwrite to replace it")
        if any(out.iterdir()) and not _written_by_lm_eval_mx(out):
            raise ValueError(f"--output {path} is not a packed MX checkpoint (config.json with quant_method mx, or "
                             "compressed-tensors beside quantize's mx_quantize.json; no subdirectories): --overwrite "
                             "replaces only a checkpoint lm-eval-mx wrote; choose another DIR")
    from .args import check_writable_dir

    check_writable_dir(out.parent, f"--output {path}: its parent")  # the checkpoint is written beside DIR, renamed
    return out


def write_beside(out: Path, write: Any) -> None:
    """``write(tmp)`` into a new directory beside ``out`` (never inside it), then put it in ``out``'s place: a failure
    leaves ``out`` as it was. The new directory gets the user's umask (mkdtemp makes it 0700)."""
    mask = os.umask(0)
    os.umask(mask)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    old = None
    try:
        write(tmp)
        os.chmod(tmp, 0o777 & ~mask)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            out.rename(old / out.name)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
        if old is not None:
            if out.exists():
                shutil.rmtree(old)
            else:  # the new checkpoint could not take its place: the old one goes back
                (old / out.name).rename(out)
                old.rmdir()


def gptq_options(ns: argparse.Namespace) -> Any:
    """The GPTQ options, refusing them with --method rtn and bad values (the engine's own checks)."""
    from ..algorithms.gptq import GPTQOptions

    given = [flag for key, flag in GPTQ_FLAGS.items() if getattr(ns, key) is not None]
    if ns.method == "rtn":
        unused = given + [f"--{k}" for k in ("calibration",) if ns.calibration is not None]
        unused += [f"--{k}" for k in CALIBRATION_DEFAULTS if getattr(ns, k) is not None]
        if unused:
            raise ValueError(f"{', '.join(unused)} would be ignored: --method rtn rounds each weight to nearest, "
                             "without calibration")
        return None
    values = {k: DEFAULTS[k] if getattr(ns, k) is None else getattr(ns, k) for k in GPTQ_FLAGS}
    if not math.isfinite(values["damp"]):
        raise ValueError(f"--damp must be a finite number >= 0, got {values['damp']}")
    if values["act_order"] and values["scales"] == "lazy":
        raise ValueError("--act_order needs --scales static: with columns out of order a block's scale cannot wait "
                         "for its first column")
    try:
        return GPTQOptions(**values)
    except ValueError as e:
        raise ValueError(str(e).replace("GPTQ block_columns", "--block_columns").replace("GPTQ damp", "--damp")
                         .replace("GPTQ expert_min_tokens", "--expert_min_tokens")) from None


def parse_inputs(ns: argparse.Namespace) -> tuple[dict[str, Any], Any, Any, list[str] | None, Any]:
    """(hf args, MXConfig, GPTQOptions or None, calibration texts, the model's transformers config): every check
    that needs no model."""
    from ..selection.config import parse_mx_args
    from .args import error_line, parse_kv, resolve_device

    args = parse_kv(ns.model_args, "--model_args")
    if "pretrained" not in args:
        raise ValueError("--model_args needs pretrained=<model path or hub id>")
    refused = [k for k in REFUSED_HF_KEYS if k in args and args[k] not in (None, False, "")]
    if refused:
        raise ValueError(f"{', '.join(refused)} in --model_args: {REFUSED_HF_KEYS[refused[0]]}")
    if str(args.get("backend", "causal")).strip().lower() not in ("causal", "default"):
        raise ValueError(f"backend={args['backend']}: quantize handles causal language models (backend=causal)")
    ignored = [k for k in IGNORED_MX_KEYS if k in args]
    if ignored:
        raise ValueError(f"{', '.join(ignored)} would be ignored: quantize always writes packed codes; how they run "
                         "(packed_gemm, mx_backend) is chosen when the output loads; drop them from --model_args")
    config, rest = parse_mx_args(args)
    if not config.selects_layers:
        raise ValueError("the MX keys select no layer (roles=none): there is nothing to quantize")
    precheck_save_format(ns.save_format, config)
    options = gptq_options(ns)
    texts = None
    if ns.method == "gptq":
        for key, default in CALIBRATION_DEFAULTS.items():
            if getattr(ns, key) is None:
                setattr(ns, key, default)
        for key in ("nsamples", "seqlen"):
            if getattr(ns, key) < 1:
                raise ValueError(f"--{key} must be >= 1, got {getattr(ns, key)}")
        if not 0 <= ns.seed < 2**63:
            raise ValueError(f"--seed must be an integer in [0, 2**63), got {ns.seed}")
        if not ns.calibration:
            raise ValueError("--method gptq needs --calibration: text files or one lm-eval task name")
        from ..algorithms.calibration import read_texts

        texts, _ = read_texts(ns.calibration)
    if Path(ns.output).resolve() == Path(str(args["pretrained"])).resolve():
        raise ValueError(f"--output {ns.output} is the model being quantized (pretrained): write elsewhere")
    check_output(ns.output, ns.overwrite, (str(args["pretrained"]), str(args.get("tokenizer") or ""),
                                           *(ns.calibration or ())))
    rest["device"] = resolve_device(ns.device, rest)
    from ..hf.model import _read_config, check_hf_args, check_model_args, detect_checkpoint

    try:
        model_config = _read_config(rest)
    except Exception as e:  # a missing path, a hub id offline, a missing gguf_file: transformers' reason, one line
        raise ValueError(f"pretrained={args['pretrained']}: its config cannot be read ({error_line(e)})") from None
    positions = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
    if ns.method == "gptq" and isinstance(positions, int) and ns.seqlen > positions:
        raise ValueError(f"--seqlen {ns.seqlen} exceeds the model's {positions} positions (max_position_embeddings); "
                         f"give --seqlen <= {positions}")
    stored, shipped = detect_checkpoint(rest)
    if stored is not None or shipped is not None:
        what = shipped.name if shipped is not None else "packed MX weights"
        raise ValueError(f"{args['pretrained']} is already quantized ({what}): quantize a high-precision checkpoint")

    check_model_args(rest)
    check_hf_args(config, rest)
    return rest, config, options, texts, model_config


def render(run: Any, out: Path, tokens: int | None) -> Any:
    """A short table: one row per role (layers, formats, rotations, and for GPTQ the summed Hessian-weighted errors
    against RTN's, the worst layer's ratio, retries); mx_quantize.json in DIR has every layer."""
    from rich.table import Table

    t = Table(title=f"lm-eval-mx quantize --method {run.method}: {len(run.layers)} layers packed in {out}")
    cols = ["role", "layers", "format", "rotation"]
    if run.results:
        cols += ["Σ H-error", "Σ RTN H-error", "ratio", "worst layer", "max damp", "retries"]
    for c in cols:
        t.add_column(c, justify="left" if c in ("role", "format", "rotation") else "right")
    roles: dict[str, list[dict[str, Any]]] = {}
    for row in run.layers:
        roles.setdefault(row["role"], []).append(row)
    for role, rows in roles.items():
        cells = [role, str(len(rows)), ",".join(sorted({r["w_format"] for r in rows})),
                 ",".join(sorted({r["rotation"] or "-" for r in rows}))]
        if run.results:
            err, rtn = sum(r["hessian_error"] for r in rows), sum(r["rtn_hessian_error"] for r in rows)
            worst = max(rows, key=lambda r: r["hessian_error"] / r["rtn_hessian_error"] if r["rtn_hessian_error"] > 0
                        else 0.0)
            wr = worst["hessian_error"] / worst["rtn_hessian_error"] if worst["rtn_hessian_error"] > 0 else float("nan")
            cells += [f"{err:.4g}", f"{rtn:.4g}", f"{err / rtn:.3f}" if rtn > 0 else "-", f"{wr:.3f}",
                      f"{max(r['relative_damping'] for r in rows):g}", str(sum(r["cholesky_retries"] for r in rows))]
        t.add_row(*cells)
    if run.results:
        s = run.summary()
        t.caption = (f"ratio = GPTQ's Hessian-weighted error tr(ΔWᵀ H ΔW) / RTN's; all layers: "
                     f"{s['hessian_error_ratio']:.4f}; layers above RTN: {s['layers_above_rtn']}; calibration "
                     f"tokens: {tokens}; per layer: {out}/mx_quantize.json")
    return t


def precheck_save_format(save_format: str, config: Any) -> None:
    """--save_format compressed-tensors: what the MX keys alone show it cannot hold, refused before the model loads
    (the rest, per layer, by :func:`check_compressed_tensors` once it has)."""
    if save_format == "compressed-tensors" and config.rotation != "none":
        raise ValueError(f"--save_format compressed-tensors: rotation={config.rotation} rotates the weights, which would "
                         "need compressed-tensors' transform config, not written by this export: drop rotation= or "
                         "use --save_format mx")


def check_on_empty_model(cfg: Any, config: Any, method: str, save_format: str) -> bool:
    """The method's plan (selection, what GPTQ cannot calibrate) and the output format's per-layer checks on the
    model built from its transformers config ``cfg`` (as :func:`parse_inputs` read it) on the meta device, so that
    they refuse before the weights load; False where the empty model cannot be built (remote code not trusted, an
    unusual checkpoint): they then run once it has loaded."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from ..algorithms.quantize_model import plan

    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=cfg.__class__.__module__.startswith(
                "transformers_modules"))
    except (OSError, ValueError, ImportError, RuntimeError, KeyError, TypeError, AttributeError):
        return False
    if save_format == "compressed-tensors":
        check_compressed_tensors(model, config, method)
    else:
        plan(model, config, method)
    return True


def check_compressed_tensors(model: Any, config: Any, method: str) -> None:
    """--save_format compressed-tensors: refuse, before any rounding, a selection it cannot hold exactly."""
    from ..algorithms.export_ct import check_layers
    from ..algorithms.quantize_model import plan

    check_layers({p.candidate.name: p.spec for p in plan(model, config, method)})


def save_output(save_format: str, model: Any, tokenizer: Any, config: Any, origin: dict[str, Any], run: Any,
                out: Path) -> None:
    """Write the quantized model to ``out`` in ``save_format`` (:data:`SAVE_FORMATS`)."""
    from ..algorithms.quantize_model import save_quantized

    if save_format == "compressed-tensors":
        save_ct(model, tokenizer, origin, run, out)
    else:
        save_quantized(model, tokenizer, config, origin, run, out)


def save_ct(model: Any, tokenizer: Any, origin: dict[str, Any], run: Any, out: Path) -> None:
    """Write the compressed-tensors checkpoint and say, in one line, where it deviates (NVFP4 global scales)."""
    from ..algorithms.export_ct import save_compressed_tensors

    export = save_compressed_tensors(model, tokenizer, origin, run.layers, out)
    if not export["exact"]:
        off = sum(d["blocks_off_in_last_bit"] for d in export["deviations"])
        print(f"lm-eval-mx quantize: compressed-tensors stores NVFP4's per-tensor scale as a divisor (s8/gs): for "
              f"{len(export['deviations'])} weights no float32 gs equals this project's ts·s8 on every block, so "
              f"{off} blocks decode differently in the last float32 bit of their scale (codes and scale bytes are "
              "GPTQ's as chosen); listed under export.deviations in mx_quantize.json")


def main(ns: argparse.Namespace) -> int:
    """Check every input, load the model, quantize, save, print the summary."""
    from rich.console import Console

    try:
        hf_args, config, options, texts, model_config = parse_inputs(ns)
    except ValueError as e:
        raise SystemExit(f"lm-eval-mx quantize: {e}") from None

    from ..algorithms.calibration import calibration_windows
    from ..algorithms.gptq import GPTQError
    from ..algorithms.quantize_model import quantize_model
    from ..hf.model import HFMXLM
    from .args import error_line

    try:  # what the selection and the output format refuse, on the model built empty, before any weight loads
        checked = check_on_empty_model(model_config, config, ns.method, ns.save_format)
    except ValueError as e:
        raise SystemExit(f"lm-eval-mx quantize: {e}") from None
    try:
        lm = HFMXLM(**hf_args, roles="none")
    except (OSError, ValueError, ImportError, RuntimeError) as e:  # what only loading tells (a corrupt file, ...)
        raise SystemExit(f"lm-eval-mx quantize: loading {hf_args['pretrained']} failed: {error_line(e)}") from None
    windows, texts_read = None, None
    try:
        if ns.save_format == "compressed-tensors" and not checked:
            check_compressed_tensors(lm.model, config, ns.method)
        if ns.method == "gptq":
            windows, texts_read = calibration_windows(lm.tokenizer, texts, ns.nsamples, ns.seqlen, ns.seed)
        run = quantize_model(lm.model, config, ns.method, windows, options, progress=True)
    except (ValueError, GPTQError) as e:  # inputs only the model can judge (selection, text too short), Cholesky
        raise SystemExit(f"lm-eval-mx quantize: {e}") from None
    origin: dict[str, Any] = {"method": ns.method, "lm_eval_mx_version": __version__}
    if options is not None:
        origin["gptq"] = {"block_columns": options.block_columns, "damp": options.damp, "act_order": options.act_order,
                          "scales": options.scales, "expert_min_tokens": options.expert_min_tokens,
                          "groups": "true-sequential by role: attn_qkv, attn_out, mlp_up, mlp_down, then other roles, "
                          "then each MoE expert's gate_up_proj, then its down_proj (one Hessian per expert from the "
                          "tokens its router sends it); lm_head after the blocks, on the final hidden states",
                          "activations": "high precision during calibration"}
        origin["calibration"] = {"source": list(ns.calibration), "nsamples": ns.nsamples, "seqlen": ns.seqlen,
                                 "seed": ns.seed, "tokens": ns.nsamples * ns.seqlen, "texts_read": texts_read,
                                 "texts_available": len(texts)}
        origin["diagnostics"] = run.summary()
    out = Path(os.path.abspath(ns.output))
    write_beside(out, lambda tmp: save_output(ns.save_format, lm.model, lm.tokenizer, config, origin, run, tmp))
    Console(width=160, stderr=False).print(render(run, out, None if windows is None else ns.nsamples * ns.seqlen))
    return 0

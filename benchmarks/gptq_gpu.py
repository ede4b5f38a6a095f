"""GPTQ / MR-GPTQ of a Llama-3.1-8B-shaped model on one GPU: per-layer and total time, peak GPU memory, and the
70B cost extrapolated from a measured 70B-shaped layer (issue 31, target 4).

The model is a transformers ``LlamaForCausalLM`` with Llama-3.1-8B's dimensions (hidden 4096, intermediate 14336,
32 heads, 8 kv heads, vocabulary 128256) and random weights (bf16, normal(0, 0.02)); the calibration windows are
random token ids (``--nsamples`` x ``--seqlen``, default 128 x 2048). Each variant (MXFP4, NVFP4, each with and
without the block-32/16 Hadamard rotation: MR-GPTQ) runs ``quantize_model(model, config, "gptq", windows)``: the
same engine as ``lm-eval-mx quantize --method gptq`` (capture, block-by-block true-sequential GPTQ, packing),
without reading text or writing the checkpoint to disk.

Only ``--layers`` blocks are built (default 4) to fit a device call; the full model's time is extrapolated as
``first block + (32 - 1) x the mean of the later blocks`` (the first block includes capturing the calibration
inputs: one unquantized forward through every built block, so for the full model this undercounts the capture by
the forward of the blocks not built, a small part of a block's GPTQ time; stated in the JSON), and the 70B one (80 blocks, hidden 8192, intermediate 28672, 64 heads, 8 kv heads) from ``--layers70``
measured 70B-shaped blocks the same way (0: not measured). Every number in the JSON says what it is.

``check`` (first, unless ``--no-check``): one 8B-shaped ``gate_proj`` weight (14336 x 4096) on a random
correlated Hessian, GPTQ with CUDA graphs against the eager per-column loop on the same GPU: codes and scales
must be bit-identical (the graphs replay the same kernels); both timed.

    python benchmarks/gptq_gpu.py --layers 4 --layers70 1 --out $OUT/gptq_gpu.json

Timeouts: each variant gets ``--variant_timeout`` seconds (SIGALRM; a variant that runs past it is recorded as
timed out), and no variant starts after ``--budget`` seconds; results are written after every step.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

SHAPES = {
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
           "layers": 32},
    "70b": {"hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64, "num_key_value_heads": 8,
            "layers": 80},
    "tiny": {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
             "layers": 32},  # --smoke: the script's own check on CPU
}
VARIANTS = {
    "mxfp4": {"format": "mxfp4"},
    "nvfp4": {"format": "nvfp4"},
    "mxfp4+hadamard": {"format": "mxfp4", "rotation": "hadamard"},
    "nvfp4+hadamard": {"format": "nvfp4", "rotation": "hadamard"},
}


class VariantTimeout(Exception):
    pass


def _alarm(_signum: int, _frame: Any) -> None:
    raise VariantTimeout


DEVICE = "cuda"


def build(shape: str, layers: int, seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = {k: v for k, v in SHAPES[shape].items() if k != "layers"}
    config = LlamaConfig(**dims, num_hidden_layers=layers, vocab_size=128256, max_position_embeddings=8192,
                         rope_theta=500000.0, tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(seed)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    return model.eval()


def run_variant(shape: str, layers: int, name: str, windows: torch.Tensor, batch_size: int) -> dict[str, Any]:
    from lm_eval_mx.algorithms.gptq import GPTQOptions
    from lm_eval_mx.algorithms.quantize_model import QuantizeRun, pack_layer, plan, run_gptq
    from lm_eval_mx.selection.config import parse_mx_args

    model = build(shape, layers, seed=0)
    config, _ = parse_mx_args(dict(VARIANTS[name]))
    sync()
    cuda = DEVICE == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    done: dict[int, float] = {}  # block index -> time its last layer was done
    t0 = time.perf_counter()

    def on_layer(layer_name: str, _result: Any) -> None:
        sync()
        done[int(layer_name.split(".")[2])] = time.perf_counter() - t0

    planned = plan(model, config, "gptq")  # what quantize_model(model, config, "gptq", windows) does, timed
    results = run_gptq(model, planned, windows, GPTQOptions(), batch_size, on_layer)
    for p in planned:
        pack_layer(p, results[p.candidate.name].packed)
    sync()
    total = time.perf_counter() - t0
    stamps = [done[i] for i in sorted(done)]
    per_block = [b - a for a, b in zip([0.0, *stamps[:-1]], stamps)]
    later = per_block[1:] or per_block
    mean_later = sum(later) / len(later)
    full = SHAPES[shape]["layers"]
    summary = QuantizeRun("gptq", results=results).summary()
    return {
        "shape": shape, "variant": name, "layers_run": layers, "seconds_total_run": round(total, 2),
        "seconds_per_block": [round(t, 2) for t in per_block],
        "seconds_pack_after_last_block": round(total - stamps[-1], 2),
        "extrapolated_full_model_seconds": round(per_block[0] + (full - 1) * mean_later + (total - stamps[-1])
                                                 * full / layers, 1),
        "extrapolation": f"first block (includes capturing the calibration inputs: one unquantized forward through the "
                         f"{layers} built blocks, not scaled to {full}) + {full - 1} x mean of the later blocks "
                         f"({len(later)} measured) + packing time x {full}/{layers}",
        "peak_gpu_memory_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "gpu_memory_before_GiB (model + windows)": round(base / 2**30, 2),
        "hessian_error_ratio_vs_rtn": summary.get("hessian_error_ratio"),
        "layers_quantized": len(results),
    }


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def check_graphs() -> dict[str, Any]:
    """Graph replay vs the eager loop on one 8B-shaped gate_proj: identical codes and scales, and both timed."""
    from lm_eval_mx.algorithms import gptq
    from lm_eval_mx.numerics.formats import NAMED_SCHEMES
    from lm_eval_mx.numerics.rotation import Rotation

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(8192, 4096, device="cuda", generator=g)
    x = x @ (torch.randn(4096, 4096, device="cuda", generator=g) * 0.05 + torch.eye(4096, device="cuda"))
    w = torch.randn(14336, 4096, device="cuda", generator=g) * 0.02
    rows = []
    for name, rotation in (("mxfp4", None), ("nvfp4", None), ("mxfp4", Rotation(32)), ("nvfp4", Rotation(16))):
        acc = gptq.HessianAccumulator(4096, rotation, "cuda")
        acc.add(x)
        h = acc.hessian()
        out = {}
        for graphs in (False, True):
            gptq._USE_GRAPHS = graphs
            torch.cuda.synchronize()
            t = time.perf_counter()
            res = gptq.gptq_weight(w, h, NAMED_SCHEMES[name], rotation)
            torch.cuda.synchronize()
            out[graphs] = (time.perf_counter() - t, res)
        gptq._USE_GRAPHS = True
        (te, re), (tg, rg) = out[False], out[True]
        same = (torch.equal(re.packed.codes, rg.packed.codes) and torch.equal(re.packed.scales, rg.packed.scales)
                and torch.equal(re.weight.view(torch.int32), rg.weight.view(torch.int32)))
        rows.append({"scheme": name, "rotation": rotation.label() if rotation else None, "bit_identical": same,
                     "eager_seconds": round(te, 3), "graph_seconds": round(tg, 3),
                     "hessian_error_ratio_vs_rtn": rg.hessian_error / rg.rtn_hessian_error})
        print(json.dumps(rows[-1]), flush=True)
    return {"weight": "14336 x 4096 (gate_proj), 8192 correlated tokens", "rows": rows}


def environment() -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        commit = ""
    import transformers

    return {"gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else "none (--smoke on CPU)", "torch": torch.__version__, "transformers": transformers.__version__,
            "commit": commit or os.environ.get("GIT_COMMIT", "unknown"), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                                                               time.gmtime())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4, help="8B-shaped blocks built and quantized (of 32)")
    p.add_argument("--layers70", type=int, default=1, help="70B-shaped blocks (of 80); 0: no 70B measurement")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--variants70", nargs="+", default=["mxfp4", "nvfp4+hadamard"], choices=list(VARIANTS))
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--batch_size", type=int, default=8, help="calibration windows per block forward")
    p.add_argument("--variant_timeout", type=int, default=240)
    p.add_argument("--budget", type=int, default=540, help="seconds after which no variant starts")
    p.add_argument("--no-check", dest="check", action="store_false")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gptq_gpu.json"))
    p.add_argument("--smoke", action="store_true", help="a tiny model on CPU: checks this script, measures nothing")
    ns = p.parse_args()
    if ns.smoke:
        global DEVICE
        DEVICE, ns.check = "cpu", False
    start = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    result: dict[str, Any] = {"environment": environment(), "calibration": f"{ns.nsamples} x {ns.seqlen} random token ids",
                              "runs": [], "skipped": []}
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        Path(ns.out).write_text(json.dumps(result, indent=1) + "\n")

    if ns.check:
        result["graph_check"] = check_graphs()
        save()
    windows = torch.randint(0, 128256, (ns.nsamples, ns.seqlen), generator=torch.Generator().manual_seed(0))
    big = "tiny" if ns.smoke else "8b"
    plan = [(big, ns.layers, v) for v in ns.variants] + [("70b", ns.layers70, v) for v in ns.variants70 if ns.layers70]
    for shape, layers, variant in plan:
        if time.perf_counter() - start > ns.budget:
            result["skipped"].append(f"{shape} {variant}: budget of {ns.budget} s spent")
            continue
        signal.alarm(ns.variant_timeout)
        try:
            row = run_variant(shape, layers, variant, windows, ns.batch_size)
        except VariantTimeout:
            row = {"shape": shape, "variant": variant, "timed_out_after_s": ns.variant_timeout}
        except torch.OutOfMemoryError as e:
            row = {"shape": shape, "variant": variant, "out_of_memory": str(e).splitlines()[0]}
        finally:
            signal.alarm(0)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        result["runs"].append(row)
        print(json.dumps(row), flush=True)
        save()
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    save()


if __name__ == "__main__":
    main()

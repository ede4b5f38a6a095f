"""Packed MX weights on a GPU: weight memory and MLP speed of a Llama-3.1-8B-shaped layer, loaded from disk.

    python benchmarks/packed_bench.py --out benchmarks/results/packed_h100.json

One random-weight decoder layer with Llama-3.1-8B's shapes is written as a
safetensors checkpoint, then loaded through ``from_pretrained`` in each of
``VARIANTS``: bf16, MX fake quantization (bf16 copies of quantized weights), and
packed MXFP8 / MXFP4 (codes + E8M0 scales; decoded per layer then cuBLAS, or in
the fused Triton GEMM; with and without MXFP8 activations). All variants stay
loaded and are timed in turns in one process on one GPU, so the ratios compare
like with like.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
import torch.nn.functional as F
from timing import bench
from transformers import AutoConfig, AutoModelForCausalLM

from lm_eval_mx import MXConfig, MXQuantizationConfig, apply_mx
from lm_eval_mx.hf.testing import PRESETS, save_random_checkpoint
from lm_eval_mx.kernels.triton_mx import mx_packed_linear_triton, mx_unpack_triton
from lm_eval_mx.numerics.packing import pack_mx

MLP = dict(roles="mlp", a_format="fp8_e4m3")
VARIANTS: dict[str, tuple[str, dict]] = {  # name: (how it is loaded, MX keys)
    "bf16": ("bf16", {}),
    "fake MXFP4 (w fp4, a fp8)": ("fake", dict(MLP, w_format="fp4_e2m1")),
    "packed MXFP8 (w fp8, a fp8)": ("packed", dict(MLP, w_format="fp8_e4m3")),
    "packed MXFP4 (w fp4, a fp8)": ("packed", dict(MLP, w_format="fp4_e2m1")),
    "packed MXFP4 fused GEMM": ("packed", dict(MLP, w_format="fp4_e2m1", packed_gemm="fused")),
    "packed MXFP4 weight-only (bf16 activations)": ("packed", dict(roles="mlp", w_format="fp4_e2m1", weight_only=True)),
    "packed NVFP4 (w nvfp4, a nvfp4)": ("packed", dict(roles="mlp", format="nvfp4")),
}


def load(path: str, how: str, keys: dict) -> tuple[torch.nn.Module, dict]:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    kw = dict(dtype=torch.bfloat16, device_map="cuda")
    if how == "packed":
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=MXQuantizationConfig(**keys), **kw)
        report = model.hf_quantizer.mx_report
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kw)
        report = apply_mx(model, MXConfig(**keys)) if how == "fake" else None
    torch.cuda.synchronize()
    mlp = model.model.layers[0].mlp
    mlp_bytes = sum(t.numel() * t.element_size() for t in mlp.parameters())
    info = {"load_s": round(time.perf_counter() - t0, 2), "model_bytes": torch.cuda.memory_allocated() - before,
            "mlp_weight_bytes": mlp_bytes}
    if report is not None and report.packed_bytes:
        info["report"] = {k: report.summary()[k] for k in ("packed_weight_bytes", "dense_weight_bytes", "packed_ratio")}
    return model, info


def sweep_dequant_tiles(reps: int) -> None:
    """Decode a 14336x4096 packed weight to bf16 with each tile, against two floors moving the same bytes:
    a device copy (half reads, half writes) and writing the bf16 output alone (what any decode must do)."""
    w = torch.randn(14336, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
    tiles = ((8, 256, 4), (16, 256, 4), (4, 512, 4), (8, 512, 4), (2, 1024, 4), (4, 1024, 4), (8, 1024, 8),
             (1, 2048, 4), (2, 2048, 8), (32, 256, 8))
    for fmt in ("fp4_e2m1", "fp8_e4m3"):
        pk = pack_mx(w, fmt)
        moved = pk.nbytes + w.numel() * 2
        src, dst = (torch.empty(moved // 2, dtype=torch.uint8, device="cuda") for _ in range(2))
        out = torch.empty_like(w)
        fns = {"copy": lambda src=src, dst=dst: dst.copy_(src), "write bf16 output": lambda out=out: out.fill_(1.0)}
        fns |= {f"tile {r}x{c} warps {nw}": lambda pk=pk, t=(r, c), nw=nw: mx_unpack_triton(pk, torch.bfloat16, t, nw)
                for r, c, nw in tiles}
        ms = bench(fns, reps)
        for name, t in ms.items():
            print(f"{fmt} {name}: {t * 1e3:.1f} us, {100 * ms['copy'] / t:.1f}% of copy, {100 * ms['write bf16 output'] / t:.1f}% of write-only")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256, 2048, 8192])
    p.add_argument("--reps", type=int, default=30, help="timing rounds (each: 10 back-to-back calls per variant)")
    p.add_argument("--out", help="write the results here as JSON")
    p.add_argument("--dequant-tiles", action="store_true",
                   help="only sweep the decode kernel's tile (rows, columns, warps) against copy and write-only bandwidth")
    ns = p.parse_args()
    if ns.dequant_tiles:
        sweep_dequant_tiles(ns.reps)
        return
    spec = dict(PRESETS["llama-3.1-8b"], num_hidden_layers=1)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "variants": {}}
    with tempfile.TemporaryDirectory() as d:
        save_random_checkpoint(d, config, dtype=torch.bfloat16, device="cuda")
        g = torch.Generator(device="cuda").manual_seed(0)
        xs = {t: torch.randn(t, 4096, device="cuda", generator=g, dtype=torch.bfloat16) for t in ns.tokens}
        mlps = {}
        for name, (how, keys) in VARIANTS.items():
            model, info = load(d, how, keys)
            mlps[name] = model.model.layers[0].mlp
            results["variants"][name] = info
        with torch.no_grad():
            for t, x in xs.items():
                ms = bench({name: lambda x=x, mlp=mlp: mlp(x) for name, mlp in mlps.items()}, ns.reps)
                for name, info in results["variants"].items():
                    info.setdefault("ms", {})[t] = ms[name]
            outs = {name: mlp(xs[2048]).float() for name, mlp in mlps.items()} if 2048 in xs else {}
        base = results["variants"]["bf16"]
        for info in results["variants"].values():
            info["ratio_vs_bf16"] = {t: round(info["ms"][t] / base["ms"][t], 3) for t in ns.tokens}
            info["mlp_weight_ratio"] = round(info["mlp_weight_bytes"] / base["mlp_weight_bytes"], 4)
        if outs:
            ref = outs["fake MXFP4 (w fp4, a fp8)"]
            for name in ("packed MXFP4 (w fp4, a fp8)", "packed MXFP4 fused GEMM"):
                results[f"max_rel_diff_vs_fake: {name}"] = ((outs[name] - ref).abs().max() / ref.abs().max()).item()
        del mlps, outs
        torch.cuda.empty_cache()

        # the GEMMs alone: cuBLAS bf16 vs the packed-weight Triton GEMM, T = 2048
        gemms = {}
        for n, k in ((14336, 4096), (4096, 14336)):
            w = torch.randn(n, k, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
            xk = torch.randn(2048, k, device="cuda", generator=g, dtype=torch.bfloat16)
            fns = {"bf16 cuBLAS": lambda xk=xk, w=w: F.linear(xk, w)}
            for fmt in ("fp8_e4m3", "fp4_e2m1"):
                pk = pack_mx(w, fmt)
                fns[f"fused {fmt}"] = lambda xk=xk, pk=pk: mx_packed_linear_triton(xk, pk)
                fns[f"dequant+cuBLAS {fmt}"] = lambda xk=xk, pk=pk: F.linear(xk, mx_unpack_triton(pk, xk.dtype))
                fns[f"decode only {fmt}"] = lambda pk=pk: mx_unpack_triton(pk, torch.bfloat16)
            row = bench(fns, ns.reps)
            gemms[f"{n}x{k}"] = {key: {"ms": ms, "ratio": round(ms / row["bf16 cuBLAS"], 3)} for key, ms in row.items()}
        results["gemm_T2048"] = gemms
        del xs
    print(json.dumps(results, indent=1))
    if ns.out:
        with open(ns.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

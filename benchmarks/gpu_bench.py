"""GPU benchmarks, one run, ratios side by side (see BENCHMARKS.md).

1. Activation quantization bandwidth vs a device copy of the same bf16 tensor (T x 4096, T x 14336),
   for the eager torch path, torch.compile of it, and the Triton kernel.
2. Llama-3.1-8B MLP block forward (H=4096, I=14336, bf16): bf16 vs MX W+A (fp8_e4m3, fp4_e2m1),
   weights quantized once, activations per forward; raw ops per backend, and a real
   transformers LlamaMLP converted by apply_mx (backend=auto).
3. Llama-3.1-8B attention (attn_bmm): sdpa vs eager vs MX attention matmuls.

    python benchmarks/gpu_bench.py [--tokens 2048 8192] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from lm_eval_mx.backends import get_quantizer
from lm_eval_mx.formats import get_format, get_rounding, get_scale_mode
from lm_eval_mx.numerics import quantize_mx_torch

EVEN, FLOOR = get_rounding("even"), get_scale_mode("floor")
BACKENDS = ("torch", "compile", "triton")


def quantizer(backend: str, fmt: str):
    f = get_format(fmt)
    if backend == "compile":  # the measured alternative to the Triton kernel
        # static: benchmark shapes are fixed, and dynamo would make the format constants symbolic
        return torch.compile(lambda x: quantize_mx_torch(x, f, 32, -1, EVEN, 8, FLOOR), dynamic=False)
    q = get_quantizer(backend)
    return lambda x: q(x, f, 32, -1, EVEN, 8, FLOOR)


def median_ms(fn, reps: int = 5) -> float:
    """Median over `reps` do_bench medians (each itself a median of many runs)."""
    return statistics.median(do_bench(fn, warmup=25, rep=100, return_mode="median") for _ in range(reps))


def bench_quant(tokens: list[int]) -> list[dict]:
    rows = []
    for t in tokens:
        for k in (4096, 14336):
            x = torch.randn(t, k, device="cuda", dtype=torch.bfloat16)
            nbytes = 2 * x.numel() * x.element_size()  # read + write
            copy = median_ms(lambda x=x: x.clone())
            row = {"shape": f"{t}x{k}", "copy_ms": copy, "copy_GBps": nbytes / copy / 1e6}
            for backend in BACKENDS:
                q = quantizer(backend, "fp8_e4m3")
                t0 = time.perf_counter()
                q(x)
                torch.cuda.synchronize()
                row[f"{backend}_first_call_s"] = time.perf_counter() - t0
                ms = median_ms(lambda q=q, x=x: q(x))
                row[f"{backend}_ms"] = ms
                row[f"{backend}_pct_of_copy"] = 100 * copy / ms
            rows.append(row)
            print(json.dumps(row))
    return rows


def bench_tiles(tokens: list[int]) -> list[dict]:
    """Triton tile sizes and warps, for choosing kernels.TILE_ELEMENTS / NUM_WARPS."""
    from lm_eval_mx.kernels import quantize_mx_triton

    f = get_format("fp8_e4m3")
    rows = []
    for t in tokens:
        for k in (4096, 14336):
            x = torch.randn(t, k, device="cuda", dtype=torch.bfloat16)
            copy = median_ms(lambda x=x: x.clone())
            row = {"shape": f"{t}x{k}"}
            for elems, warps in ((512, 2), (1024, 2), (1024, 4), (2048, 2), (2048, 4), (4096, 8)):
                ms = median_ms(lambda x=x, e=elems, w=warps: quantize_mx_triton(x, f, 32, -1, EVEN, 8, FLOOR, e, w))
                row[f"{elems}/{warps}w"] = round(100 * copy / ms, 1)
            rows.append(row)
            print(json.dumps(row))
    return rows


def bench_mlp(tokens: list[int]) -> list[dict]:
    h, i = 4096, 14336
    g = torch.Generator(device="cuda").manual_seed(0)
    wg = torch.randn(i, h, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    wu = torch.randn(i, h, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
    wd = torch.randn(h, i, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02

    def mlp(x, wg, wu, wd, qa=None):
        xa = x if qa is None else qa(x)
        hid = F.silu(F.linear(xa, wg)) * F.linear(xa, wu)  # gate/up share one quantized input
        return F.linear(hid if qa is None else qa(hid), wd)

    rows = []
    for t in tokens:
        x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16, generator=g)
        base = median_ms(lambda x=x: mlp(x, wg, wu, wd))
        row = {"tokens": t, "bf16_ms": base}
        for fmt in ("fp8_e4m3", "fp4_e2m1"):
            qw = quantizer("torch", fmt)
            wq = [qw(w) for w in (wg, wu, wd)]  # once, as at load
            for backend in BACKENDS:
                qa = quantizer(backend, fmt)
                ms = median_ms(lambda qa=qa, x=x, wq=wq: mlp(x, *wq, qa=qa))
                row[f"{fmt}_{backend}_ms"] = ms
                row[f"{fmt}_{backend}_ratio"] = ms / base
        rows.append(row)
        print(json.dumps(row))
    return rows


def bench_module(tokens: list[int]) -> list[dict]:
    """A real transformers LlamaMLP, converted in place by apply_mx, vs its bf16 twin."""
    import copy

    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from lm_eval_mx import apply_mx, parse_mx_args

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336)
    base = LlamaMLP(cfg).to("cuda", torch.bfloat16).eval()
    rows = []
    for t in tokens:
        x = torch.randn(1, t, 4096, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            ms_base = median_ms(lambda x=x: base(x))
            row = {"tokens": t, "bf16_ms": ms_base}
            for fmt in ("fp8_e4m3", "fp4_e2m1"):
                mx = copy.deepcopy(base)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                # a bare LlamaMLP has no enclosing block to give roles: select by pattern
                report = apply_mx(mx, parse_mx_args({"format": fmt, "include": "proj"})[0])
                torch.cuda.synchronize()
                row[f"{fmt}_apply_s"] = time.perf_counter() - t0
                assert len(report.replaced) == 3
                ms = median_ms(lambda mx=mx, x=x: mx(x))
                row[f"{fmt}_ms"] = ms
                row[f"{fmt}_ratio"] = ms / ms_base
                del mx
        rows.append(row)
        print(json.dumps(row))
    return rows


def bench_attention(tokens: list[int]) -> list[dict]:
    """Llama-3.1-8B attention (32 heads, 8 KV heads, d=128, causal, bf16): sdpa vs eager vs MX eager."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import eager_mask
    from transformers.models.llama.modeling_llama import eager_attention_forward

    from lm_eval_mx import attention
    from lm_eval_mx.layers import MXSpec

    class Mod(torch.nn.Module):
        num_key_value_groups, is_causal = 4, True

        def __init__(self):
            super().__init__()
            self.config = type("Cfg", (), {})()

    mod = Mod().eval()
    s = 128**-0.5
    rows = []
    for t in [min(x, 4096) for x in tokens]:
        q = torch.randn(1, 32, t, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, 8, t, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, 8, t, 128, device="cuda", dtype=torch.bfloat16)
        mask = eager_mask(batch_size=1, q_length=t, kv_length=t, dtype=torch.bfloat16, device="cuda")
        row = {"tokens": t}
        row["sdpa_ms"] = base = median_ms(lambda q=q, k=k, v=v: sdpa_attention_forward(mod, q, k, v, None, scaling=s))
        row["eager_ratio"] = median_ms(lambda q=q, k=k, v=v, m=mask: eager_attention_forward(mod, q, k, v, m, s)) / base
        for fmt in ("fp8_e4m3", "fp4_e2m1"):
            attention._STATES[id(mod.config)] = attention._State(MXSpec.make(fmt, fmt), True, "sdpa")
            ms = median_ms(lambda q=q, k=k, v=v, m=mask: attention.mx_attention_forward(mod, q, k, v, m, scaling=s))
            row[f"mx_{fmt}_ratio"] = ms / base
        attention._STATES.pop(id(mod.config), None)
        rows.append(row)
        print(json.dumps(row))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--out", default=None)
    p.add_argument("--tiles", action="store_true", help="only sweep the Triton kernel's tile size and warps")
    p.add_argument("--attention", action="store_true", help="only the attention-matmul benchmark")
    ns = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    if ns.tiles:
        bench_tiles(ns.tokens)
        return
    if ns.attention:
        out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "attention": bench_attention(ns.tokens)}
        if ns.out:
            with open(ns.out, "w") as f:
                json.dump(out, f, indent=2)
        return
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "quant": bench_quant(ns.tokens), "mlp": bench_mlp(ns.tokens), "module": bench_module(ns.tokens),
           "attention": bench_attention(ns.tokens)}
    if ns.out:
        with open(ns.out, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()

"""GPU benchmarks: every variant timed in turns in one process (benchmarks/timing.py), ratios from one run.

1. ``quant``: activation quantization (bf16 in, bf16 out) against a device copy of the same tensor, for
   MXFP8, MXFP4, NVFP4 (its per-tensor maximum pass included) and block-Hadamard-rotated MXFP4 / NVFP4.
2. ``tiles``: the flat kernel's elements per program and warps (to choose triton_mx.TILE_ELEMENTS/NUM_WARPS), for
   MXFP8, MXFP4 and MXFP4 + H32; ``amax``: NVFP4's maximum pass (elements per tile, tiles per program, warps:
   triton_mx.AMAX) and the quantization pass's tile order after it (REVERSE_AFTER_AMAX), against a copy;
   ``decode``: GPU time per call at decode sizes (20 calls captured in a CUDA graph, so no host time) per tile.
3. ``mlp``: a transformers ``LlamaMLP`` of Llama-3.1-8B's shapes converted by ``apply_mx``, against bf16 and
   against a bf16 control on the same fake-quantized weights and inputs.
4. ``host``: microseconds of host time per MX activation call at decode size (no GPU wait), beside F.linear.
5. ``attention`` (only when named): Llama-3.1-8B attention, sdpa vs eager vs MX attention matmuls.

    python benchmarks/gpu_bench.py [--only quant tiles amax decode mlp host attention] [--out results.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from timing import bench

from lm_eval_mx.kernels import triton_mx
from lm_eval_mx.kernels.triton_mx import quantize_triton
from lm_eval_mx.numerics.formats import NAMED_SCHEMES
from lm_eval_mx.numerics.quantize import make_scheme
from lm_eval_mx.numerics.rotation import Rotation

SHAPES = [(2048, 4096), (2048, 14336), (8192, 4096), (8192, 14336)]
MXFP8, MXFP4, NVFP4 = make_scheme("fp8_e4m3"), make_scheme("fp4_e2m1"), NAMED_SCHEMES["nvfp4"]
QUANT = {  # name: (scheme, rotation, bytes moved per element of bf16 input besides the copy's read+write)
    "MXFP8": (MXFP8, None, 0),
    "MXFP4": (MXFP4, None, 0),
    "NVFP4 (+ amax pass)": (NVFP4, None, 2),
    "NVFP4 (+ amax pass), tiles in order": (NVFP4, None, 2),
    "MXFP4 + H32": (MXFP4, Rotation(32), 0),
    "NVFP4 + H16 (+ amax pass)": (NVFP4, Rotation(16), 2),
}


def bench_quant(reps: int) -> list[dict]:
    rows = []
    for t, k in SHAPES:
        x = torch.randn(t, k, device="cuda", dtype=torch.bfloat16)
        fns = {"copy": lambda x=x: x.clone()}
        fns |= {name: lambda x=x, s=s, r=r, rev="in order" not in name: quantize_triton(x, s, -1, r, reverse=rev)
                for name, (s, r, _) in QUANT.items()}
        ms = bench(fns, reps)
        row = {"shape": f"{t}x{k}", "copy_ms": ms["copy"], "copy_TBps": 4 * x.numel() / ms["copy"] / 1e9}
        for name, (_, _, extra) in QUANT.items():
            row[f"{name} % of copy time"] = round(100 * ms["copy"] / ms[name], 1)
            if extra:  # the same, counting the bytes the kernel really moves (the extra read of the maximum pass)
                row[f"{name} % of copy bandwidth"] = round(100 * ms["copy"] / ms[name] * (4 + extra) / 4, 1)
        rows.append(row)
        print(json.dumps(row))
    return rows


def bench_tiles(reps: int) -> list[dict]:
    rows = []
    choices = [(1024, 2), (1024, 4), (2048, 4), (2048, 8), (4096, 4), (4096, 8), (8192, 8), (8192, 16)]
    for t, k in SHAPES[1:]:
        x = torch.randn(t, k, device="cuda", dtype=torch.bfloat16)
        for name, scheme, rot in (("MXFP8", MXFP8, None), ("MXFP4", MXFP4, None), ("MXFP4 + H32", MXFP4, Rotation(32))):
            fns = {"copy": lambda x=x: x.clone()}
            fns |= {f"{e}/{w}w": lambda x=x, e=e, w=w, s=scheme, r=rot: quantize_triton(x, s, -1, r, e, w)
                    for e, w in choices}
            ms = bench(fns, reps)
            row = {"shape": f"{t}x{k}", "format": name} | {c: round(100 * ms["copy"] / v, 1) for c, v in ms.items()
                                                           if c != "copy"}
            rows.append(row)
            print(json.dumps(row))
    return rows


AMAX_CHOICES = [(4096, 16, 4), (4096, 4, 4), (4096, 1, 4), (8192, 4, 8), (16384, 1, 8), (2048, 8, 2)]


def bench_amax(reps: int) -> list[dict]:
    """NVFP4 (maximum pass + quantization pass) per maximum-pass configuration and tile order, % of copy time."""
    rows = []
    for t, k in SHAPES[1:]:
        x = torch.randn(t, k, device="cuda", dtype=torch.bfloat16)
        fns = {"copy": lambda x=x: x.clone()}
        fns |= {f"amax {e}/{n}t/{w}w {'reversed' if rev else 'in order'}":
                lambda x=x, a=(e, n, w), rev=rev: quantize_triton(x, NVFP4, -1, None, amax=a, reverse=rev)
                for e, n, w in AMAX_CHOICES for rev in (True, False)}
        ms = bench(fns, reps)
        row = {"shape": f"{t}x{k}"} | {c: round(100 * ms["copy"] / v, 1) for c, v in ms.items() if c != "copy"}
        rows.append(row)
        print(json.dumps(row))
    return rows


DECODE_SHAPES = [(8, 2048), (8, 4096), (8, 14336), (32, 4096), (64, 14336)]
DECODE_TILES = [(4096, 4), (2048, 4), (1024, 4), (1024, 2), (512, 1), (256, 1)]


def _graph_us(fn, calls: int = 20, reps: int = 20) -> float:
    """GPU µs per call: ``calls`` calls captured in one CUDA graph, replayed (median of reps)."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    return sorted(times)[len(times) // 2]


def bench_decode() -> list[dict]:
    """GPU time of one quantizer call at decode sizes (no host time: CUDA graphs), per flat-kernel tile."""
    rows = []
    for t, k in DECODE_SHAPES:
        x = torch.randn(t, k, device="cuda", dtype=torch.bfloat16)
        row: dict = {"shape": f"{t}x{k}", "copy_us": round(_graph_us(lambda x=x: x.clone()), 2)}
        for name, s in (("MXFP8", MXFP8), ("NVFP4", NVFP4)):
            for e, w in DECODE_TILES:
                row[f"{name} {e}/{w}w us"] = round(_graph_us(lambda x=x, s=s, e=e, w=w: quantize_triton(x, s, -1, None, e, w)), 2)
        local, triton_mx.LOCAL_MAX_ELEMENTS = triton_mx.LOCAL_MAX_ELEMENTS, 0  # captured with the maximum pass
        row["NVFP4 4096/4w, maximum pass us"] = round(_graph_us(lambda x=x: quantize_triton(x, NVFP4, -1, None)), 2)
        triton_mx.LOCAL_MAX_ELEMENTS = local
        rows.append(row)
        print(json.dumps(row))
    return rows


MLP_VARIANTS = {  # name: MX keys (None: bf16)
    "MXFP8": {"format": "fp8_e4m3"},
    "MXFP4": {"format": "fp4_e2m1"},
    "NVFP4": {"format": "nvfp4"},
    "MXFP4 + H32": {"format": "fp4_e2m1", "rotation": "hadamard"},
}


def _control(mx: torch.nn.Module, base: torch.nn.Module) -> torch.nn.Module:
    """A bf16 LlamaMLP holding the MX model's fake-quantized weights: GEMM speed on the same data."""
    ctl = copy.deepcopy(base)
    for name in ("gate_proj", "up_proj", "down_proj"):
        getattr(ctl, name).weight.data.copy_(getattr(mx, name).weight.data)
    return ctl


def bench_mlp(tokens: list[int], reps: int) -> list[dict]:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from lm_eval_mx import apply_mx, parse_mx_args

    base = LlamaMLP(LlamaConfig(hidden_size=4096, intermediate_size=14336)).to("cuda", torch.bfloat16).eval()
    for p in base.parameters():
        torch.nn.init.normal_(p, std=0.02)
    mx, notes = {}, {}
    for name, keys in MLP_VARIANTS.items():
        m = copy.deepcopy(base)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        report = apply_mx(m, parse_mx_args({**keys, "include": "proj"})[0])  # a bare MLP: select by pattern
        torch.cuda.synchronize()
        notes[name] = {"apply_s": round(time.perf_counter() - t0, 3), "notes": report.notes}
        mx[name] = m
    rows = []
    with torch.no_grad():
        for t in tokens:
            x = torch.randn(1, t, 4096, device="cuda", dtype=torch.bfloat16)
            fns = {"bf16": lambda x=x: base(x)}
            for name, m in mx.items():
                xq = m.gate_proj.mx_spec.act(x).clone()  # the control multiplies the same quantized input
                ctl = _control(m, base)
                fns[name] = lambda x=x, m=m: m(x)
                fns[f"bf16 control on {name} data"] = lambda xq=xq, ctl=ctl: ctl(xq)
            ms = bench(fns, reps)
            row = {"tokens": t, "bf16_ms": ms["bf16"]} | {k: round(v / ms["bf16"], 3) for k, v in ms.items()}
            rows.append(row)
            print(json.dumps(row))
    rows.append({"apply": notes})
    return rows


def _attention_fns(mod, mods: dict, q, k, v, mask, s: float) -> dict:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.llama.modeling_llama import eager_attention_forward

    from lm_eval_mx.nn import attention

    fns = {"sdpa": lambda: sdpa_attention_forward(mod, q, k, v, None, scaling=s),
           "eager": lambda: eager_attention_forward(mod, q, k, v, mask, s)}
    return fns | {f"MX {fmt}": lambda m=m: attention.mx_attention_forward(m, q, k, v, mask, scaling=s)
                  for fmt, m in mods.items()}


def bench_attention(tokens: list[int], reps: int) -> list[dict]:
    """Llama-3.1-8B attention (32 heads, 8 KV heads, d=128, causal, bf16): sdpa vs eager vs MX eager."""
    from transformers.masking_utils import eager_mask

    from lm_eval_mx.nn import attention
    from lm_eval_mx.nn.spec import MXSpec

    class Mod(torch.nn.Module):
        num_key_value_groups, is_causal = 4, True

        def __init__(self):
            super().__init__()
            self.config = type("Cfg", (), {})()

    mods = {fmt: Mod().eval() for fmt in ("fp8_e4m3", "fp4_e2m1")}
    for fmt, mod in mods.items():
        attention._STATES[id(mod.config)] = attention._State(MXSpec.make(fmt, fmt), True, "sdpa")
    s = 128**-0.5
    rows = []
    for t in [min(x, 4096) for x in tokens]:
        q = torch.randn(1, 32, t, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, 8, t, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, 8, t, 128, device="cuda", dtype=torch.bfloat16)
        mask = eager_mask(batch_size=1, q_length=t, kv_length=t, dtype=torch.bfloat16, device="cuda")
        fns = _attention_fns(Mod().eval(), mods, q, k, v, mask, s)
        ms = bench(fns, reps)
        row = {"tokens": t, "sdpa_ms": ms["sdpa"]} | {k_: round(v_ / ms["sdpa"], 3) for k_, v_ in ms.items()}
        rows.append(row)
        print(json.dumps(row))
    for mod in mods.values():
        attention._STATES.pop(id(mod.config), None)
    return rows


def bench_host(iters: int = 2000) -> dict:
    """Host microseconds per call at decode size: the GPU never waits for these (8 tokens), so the loop
    measures what each call costs the CPU; F.linear and a plain Triton-free op for scale."""
    from lm_eval_mx.nn.spec import MXSpec

    out = {}
    for k in (2048, 4096):
        x = torch.randn(8, 1, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(k, k, device="cuda", dtype=torch.bfloat16)
        specs = {"MXFP8 act": MXSpec.make("fp8_e4m3", "fp8_e4m3"), "NVFP4 act": MXSpec(NVFP4, NVFP4),
                 "MXFP4+H32 act": MXSpec.make("fp4_e2m1", "fp4_e2m1", rotation=Rotation(32))}
        fns = {name: lambda s=s, x=x: s.act_quantizer(x) for name, s in specs.items()}
        fns |= {"F.linear": lambda x=x, w=w: torch.nn.functional.linear(x, w), "x.clone": lambda x=x: x.clone()}
        for name, fn in fns.items():
            for _ in range(50):
                fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            host = (time.perf_counter() - t0) / iters * 1e6
            torch.cuda.synchronize()
            out[f"{name} k={k}"] = round(host, 2)
    print(json.dumps({"host_us_per_call": out}))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", default=["quant", "tiles", "mlp", "host"],
                   choices=["quant", "tiles", "amax", "decode", "mlp", "host", "attention"])
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--out", default=None)
    ns = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    import triton

    res["triton"] = triton.__version__
    if "quant" in ns.only:
        res["quant"] = bench_quant(ns.reps)
    if "tiles" in ns.only:
        res["tiles"] = bench_tiles(ns.reps)
    if "amax" in ns.only:
        res["amax"] = bench_amax(ns.reps)
    if "decode" in ns.only:
        res["decode"] = bench_decode()
    if "mlp" in ns.only:
        res["mlp"] = bench_mlp(ns.tokens, ns.reps)
    if "host" in ns.only:
        res["host"] = bench_host()
    if "attention" in ns.only:
        res["attention"] = bench_attention(ns.tokens, ns.reps)
    if ns.out:
        with open(ns.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()

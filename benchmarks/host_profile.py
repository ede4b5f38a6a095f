"""Where the host time of an MX decode step goes (the profile behind BENCHMARKS.md's generation numbers).

1. cProfile of the MX activation quantizer called at decode size (8 tokens), functions by own time.
2. torch.profiler of decode steps of a random Llama-3.2-1B-shaped model, hf vs hf-mx MXFP8 (all projections):
   operators by self CPU time.
3. Wall time per decode step of the same model, in turns: hf, hf-mx MXFP8, and hf-mx with the quantizer
   replaced by the identity (what the MX layers cost without any quantization kernel).

    python benchmarks/host_profile.py
"""

from __future__ import annotations

import cProfile
import io
import pstats

import torch
from torch.profiler import ProfilerActivity, profile

from lm_eval_mx import apply_mx, parse_mx_args
from lm_eval_mx.nn.spec import MXSpec


def quantizer_profile(calls: int = 3000) -> None:
    spec = MXSpec.make("fp8_e4m3", "fp8_e4m3")
    x = torch.randn(8, 1, 2048, device="cuda", dtype=torch.bfloat16)
    for _ in range(50):
        spec.quantizer(x, spec.a, -1, None)
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        spec.quantizer(x, spec.a, -1, None)
    prof.disable()
    torch.cuda.synchronize()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(14)
    print(f"cProfile, {calls} MXFP8 activation calls at 8x2048 (per-call = tottime / ncalls):")
    print("\n".join(out.getvalue().splitlines()[:40]))


def decode_profile(steps: int = 8) -> None:
    from generate_bench import build

    base, _ = build("llama-3.2-1b", "cuda")
    mx = __import__("copy").deepcopy(base)
    apply_mx(mx, parse_mx_args({"format": "fp8_e4m3"})[0])
    ids = torch.randint(0, 300, (8, 64), device="cuda")
    for name, model in (("hf", base), ("hf-mx MXFP8", mx)):
        with torch.no_grad():
            model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                model.generate(ids, max_new_tokens=steps, do_sample=False)
                torch.cuda.synchronize()
        print(f"== {name}: {steps} decode steps, operators by self CPU time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=48))


def decode_split(steps: int = 32, passes: int = 3) -> None:
    import copy
    import time

    from generate_bench import build

    from lm_eval_mx.nn.layers import MXLayer

    base, _ = build("llama-3.2-1b", "cuda")
    mx = copy.deepcopy(base)
    apply_mx(mx, parse_mx_args({"format": "fp8_e4m3"})[0])

    def swapped(fn):  # the MX model with another quantizer in every layer
        other = copy.deepcopy(mx)
        for m in other.modules():
            if isinstance(m, MXLayer):
                m.mx_spec = copy.copy(m.mx_spec)
                m.mx_spec.__dict__["quantizer"] = fn
        return other

    ids = torch.randint(0, 300, (8, 64), device="cuda")
    variants = {
        "hf": base,
        "hf-mx MXFP8": mx,
        "hf-mx, quantizer = identity": swapped(lambda x, *_: x),  # MX layer code, no kernel
        "hf-mx, quantizer = x.clone()": swapped(lambda x, *_: x.clone()),  # one plain kernel launch instead
        "hf-mx, torch backend": swapped(__import__("lm_eval_mx.numerics.quantize").numerics.quantize_torch),
    }
    torch.cuda.set_sync_debug_mode("error")  # a host-device synchronization in the quantizer would raise here
    x = torch.randn(8, 1, 2048, device="cuda", dtype=torch.bfloat16)
    spec = next(m.mx_spec for m in mx.modules() if isinstance(m, MXLayer))
    spec.quantizer(x, spec.a, -1, spec.rotation)
    torch.cuda.set_sync_debug_mode("default")
    print("no host-device synchronization in an MXFP8 activation call")
    best = dict.fromkeys(variants, float("inf"))
    with torch.no_grad():
        for model in variants.values():
            model.generate(ids, max_new_tokens=4, do_sample=False)
        for _ in range(passes):
            for name, model in variants.items():
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                model.generate(ids, max_new_tokens=steps + 1, min_new_tokens=steps + 1, do_sample=False)
                torch.cuda.synchronize()
                best[name] = min(best[name], (time.perf_counter() - t0) / (steps + 1))
    print(f"== wall ms per generated token (batch 8, {steps + 1} tokens, best of {passes} passes in turns)")
    for name, t in best.items():
        print(f"{name:32s} {t * 1e3:7.2f} ms  {t / best['hf']:.3f}x")


if __name__ == "__main__":
    quantizer_profile()
    decode_profile()
    decode_split()

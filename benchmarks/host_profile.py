"""Where the host time of an MX decode step goes (the profile behind BENCHMARKS.md's generation numbers).

1. cProfile of the MX activation quantizer called at decode size (8 tokens), functions by own time.
2. torch.profiler of decode steps of a random Llama-3.2-1B-shaped model, hf vs hf-mx MXFP8 (all projections):
   operators by self CPU time.

    python benchmarks/host_profile.py
"""

from __future__ import annotations

import cProfile
import io
import pstats

import torch
from torch.profiler import ProfilerActivity, profile

from lm_eval_mx import apply_mx, parse_mx_args
from lm_eval_mx.layers import MXSpec


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


if __name__ == "__main__":
    quantizer_profile()
    decode_profile()

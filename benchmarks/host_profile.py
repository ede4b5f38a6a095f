"""Where the host time of an MX decode step goes (the profile behind BENCHMARKS.md's generation numbers).

0. Host microseconds per MX activation call at decode size, in turns in one process: the input quantizer
   (``spec.act_quantizer``, compiled kernels launched through their own launcher), the same with every launch
   through ``JITFunction.run`` (``launch.FAST = False``: the launch path before), and, given ``--old DIR`` (a
   copy of an earlier commit's ``lm_eval_mx`` package, e.g. ``git archive 45a35ba lm_eval_mx | tar -x -C DIR``),
   that commit's ``spec.quantizer``; F.linear and x.clone for scale.
1. cProfile of the MX activation quantizer called at decode size (8 tokens), functions by own time.
2. torch.profiler of decode steps of a random Llama-3.2-1B-shaped model, hf vs hf-mx MXFP8 (all projections):
   operators by self CPU time.
3. Wall time per decode step of the same model, in turns: hf, hf-mx MXFP8 (and with the plain launch path),
   and hf-mx with the quantizer replaced by the identity (what the MX layers cost without any quantization kernel).

    python benchmarks/host_profile.py [--only percall cprofile decode split] [--old DIR]
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from lm_eval_mx import apply_mx, parse_mx_args
from lm_eval_mx.kernels import launch
from lm_eval_mx.nn.spec import MXSpec


def _old_package(path: str):
    """An earlier commit's lm_eval_mx (its modules import each other relatively) as the package ``lm_eval_mx_old``."""
    init = Path(path) / "lm_eval_mx" / "__init__.py"
    spec = importlib.util.spec_from_file_location("lm_eval_mx_old", init, submodule_search_locations=[str(init.parent)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["lm_eval_mx_old"] = mod
    spec.loader.exec_module(mod)
    return importlib.import_module("lm_eval_mx_old.nn.spec")


def _specs(spec_mod) -> dict:
    """The benchmarked specs, built from the package of ``spec_mod`` (an old package's enums are its own)."""
    root = spec_mod.__name__.rsplit(".nn.", 1)[0]
    mx = spec_mod.MXSpec
    nvfp4 = importlib.import_module(f"{root}.numerics.formats").NAMED_SCHEMES["nvfp4"]
    rot = importlib.import_module(f"{root}.numerics.rotation").Rotation
    return {"MXFP8": mx.make("fp8_e4m3", "fp8_e4m3"), "NVFP4": mx(nvfp4, nvfp4),
            "MXFP4+H32": mx.make("fp4_e2m1", "fp4_e2m1", rotation=rot(32))}


def _timed(fn, fast: bool, calls: int) -> float:
    launch.FAST = fast
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t = (time.perf_counter() - t0) / calls * 1e6
    torch.cuda.synchronize()
    return t


def _percall_fns(k: int, olds: dict) -> dict:
    """name: (function, launch.FAST while it runs) for inputs of 8 tokens x ``k``."""
    x = torch.randn(8, 1, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(k, k, device="cuda", dtype=torch.bfloat16)
    fns = {}
    for name, s in _specs(sys.modules["lm_eval_mx.nn.spec"]).items():
        fns[f"{name} act_quantizer"] = (lambda s=s: s.act_quantizer(x), True)
        fns[f"{name} act_quantizer, JITFunction.run"] = (lambda s=s: s.act_quantizer(x), False)
        fns[f"{name} quantizer(x, a, -1, rot)"] = (lambda s=s: s.quantizer(x, s.a, -1, s.rotation), True)
        if name in olds:
            o = olds[name]
            fns[f"{name} old commit quantizer(x, a, -1, rot)"] = (lambda o=o: o.quantizer(x, o.a, -1, o.rotation), True)
    fns["F.linear"] = (lambda: torch.nn.functional.linear(x, w), True)
    fns["x.clone"] = (lambda: x.clone(), True)
    return fns


def per_call(old: str | None, rounds: int = 15, calls: int = 400) -> dict:
    """Host us per call (median of rounds; variants in turns) at 8 tokens x 2048 and x 4096, bf16. The GPU
    keeps up with these small kernels, so the loop measures the CPU's cost of each call."""
    olds = _specs(_old_package(old)) if old else {}
    out = {}
    for k in (2048, 4096):
        fns = _percall_fns(k, olds)
        for fn, fast in fns.values():
            for _ in range(50):
                _timed(fn, fast, 1)
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(rounds):
            for name, (fn, fast) in fns.items():
                times[name].append(_timed(fn, fast, calls))
        out[f"k={k}"] = {name: round(statistics.median(t), 2) for name, t in times.items()}
    launch.FAST = True
    print(json.dumps({"host_us_per_call": out}, indent=1))
    return out


def quantizer_profile(calls: int = 3000) -> None:
    spec = MXSpec.make("fp8_e4m3", "fp8_e4m3")
    x = torch.randn(8, 1, 2048, device="cuda", dtype=torch.bfloat16)
    for _ in range(50):
        spec.act_quantizer(x)
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        spec.act_quantizer(x)
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
                m.mx_spec.__dict__["act_quantizer"] = lambda x, s=m.mx_spec: fn(x, s.a, -1, s.rotation)
        return other

    ids = torch.randint(0, 300, (8, 64), device="cuda")
    variants = {
        "hf": base,
        "hf-mx MXFP8": mx,
        "hf-mx MXFP8, JITFunction.run launches": mx,  # the same model, launch.FAST off while it runs
        "hf-mx, quantizer = identity": swapped(lambda x, *_: x),  # MX layer code, no kernel
        "hf-mx, quantizer = x.clone()": swapped(lambda x, *_: x.clone()),  # one plain kernel launch instead
        "hf-mx, torch backend": swapped(__import__("lm_eval_mx.numerics.quantize").numerics.quantize_torch),
    }
    torch.cuda.set_sync_debug_mode("error")  # a host-device synchronization in the quantizer would raise here
    x = torch.randn(8, 1, 2048, device="cuda", dtype=torch.bfloat16)
    spec = next(m.mx_spec for m in mx.modules() if isinstance(m, MXLayer))
    spec.act_quantizer(x)
    torch.cuda.set_sync_debug_mode("default")
    print("no host-device synchronization in an MXFP8 activation call")
    best = dict.fromkeys(variants, float("inf"))
    with torch.no_grad():
        for model in variants.values():
            model.generate(ids, max_new_tokens=4, do_sample=False)
        for _ in range(passes):
            for name, model in variants.items():
                launch.FAST = "JITFunction.run" not in name
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                model.generate(ids, max_new_tokens=steps + 1, min_new_tokens=steps + 1, do_sample=False)
                torch.cuda.synchronize()
                best[name] = min(best[name], (time.perf_counter() - t0) / (steps + 1))
        launch.FAST = True
    print(f"== wall ms per generated token (batch 8, {steps + 1} tokens, best of {passes} passes in turns)")
    for name, t in best.items():
        print(f"{name:32s} {t * 1e3:7.2f} ms  {t / best['hf']:.3f}x")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", default=["percall", "cprofile", "decode", "split"],
                   choices=["percall", "cprofile", "decode", "split"])
    p.add_argument("--old", default=None, help="directory holding an earlier commit's lm_eval_mx package")
    p.add_argument("--out", default=None, help="JSON file for the per-call numbers")
    ns = p.parse_args()
    if "percall" in ns.only:
        res = {"device": torch.cuda.get_device_name(), "percall": per_call(ns.old)}
        if ns.out:
            Path(ns.out).write_text(json.dumps(res, indent=1))
    if "cprofile" in ns.only:
        quantizer_profile()
    if "decode" in ns.only:
        decode_profile()
    if "split" in ns.only:
        decode_split()

"""Do CUDA graphs / torch.compile of the decode step remove MX's host cost in generation? (a measurement)

A random model of Llama-3.2-1B's layer shapes (fewer layers, so compiling stays short), greedy decoding
with transformers' static cache, batch 8. Variants, timed in turns in one process, best of the passes:
hf and hf-mx MXFP8 (all projections), each eager and with transformers' compiled decode step
(``CompileConfig(mode="reduce-overhead")``: torch.compile with CUDA graphs). Prints ms per generated token, the graph
breaks torch.compile meets in hf-mx's forward, and whether the compiled hf-mx generates the same tokens
as the eager one.

    python benchmarks/decode_compile.py --layers 4
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from lm_eval_mx import apply_mx, parse_mx_args


def build(layers: int) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    from lm_eval_mx.hf.testing import PRESETS, randomize_

    spec = dict(PRESETS["llama-3.2-1b"], num_hidden_layers=layers)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return randomize_(model, 0.02).eval()


def generate(model: torch.nn.Module, ids: torch.Tensor, tokens: int, compiled: bool) -> torch.Tensor:
    """Greedy decoding with the static cache; ``compiled``: transformers' own compiled decode step."""
    from transformers import CompileConfig

    extra = {"compile_config": CompileConfig(fullgraph=False, mode="reduce-overhead")} if compiled else {
        "disable_compile": True}
    return model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                          cache_implementation="static", pad_token_id=0, **extra)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=33)
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--out", default=None)
    ns = p.parse_args()
    base = build(ns.layers)
    mx = copy.deepcopy(base)
    apply_mx(mx, parse_mx_args({"format": "fp8_e4m3"})[0])
    ids = torch.randint(0, 300, (8, 64), device="cuda")

    explain = torch._dynamo.explain(copy.deepcopy(mx))(ids)
    reasons = sorted({str(b.reason).splitlines()[0][:160] for b in explain.break_reasons})
    print(f"hf-mx forward under torch.compile: {explain.graph_count} graphs, {explain.graph_break_count} breaks")
    for r in reasons[:8]:
        print("  break:", r)

    variants = {"hf eager": base, "hf-mx eager": mx, "hf compiled": copy.deepcopy(base),
                "hf-mx compiled": copy.deepcopy(mx)}
    out: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": ns.layers,
                 "graphs": explain.graph_count, "graph_breaks": explain.graph_break_count, "break_reasons": reasons}
    with torch.no_grad():
        first = {}
        for name, m in variants.items():
            t0 = time.perf_counter()
            first[name] = generate(m, ids, ns.tokens, name.endswith("compiled"))
            torch.cuda.synchronize()
            out[f"{name} first call s"] = round(time.perf_counter() - t0, 1)
        out["compiled hf-mx tokens == eager hf-mx tokens"] = bool(torch.equal(first["hf-mx compiled"], first["hf-mx eager"]))
        out["compiled hf tokens == eager hf tokens"] = bool(torch.equal(first["hf compiled"], first["hf eager"]))
        best = dict.fromkeys(variants, float("inf"))
        for _ in range(ns.passes):
            for name, m in variants.items():
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                generate(m, ids, ns.tokens, name.endswith("compiled"))
                torch.cuda.synchronize()
                best[name] = min(best[name], (time.perf_counter() - t0) / ns.tokens)
    out["ms_per_token"] = {k: round(v * 1e3, 3) for k, v in best.items()}
    out["ratio_eager"] = round(best["hf-mx eager"] / best["hf eager"], 3)
    out["ratio_compiled"] = round(best["hf-mx compiled"] / best["hf compiled"], 3)
    print(json.dumps(out, indent=1))
    if ns.out:
        with open(ns.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

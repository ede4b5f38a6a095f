"""generate_until through lm-eval's model API: hf-mx vs hf, every variant timed in turns in one process.

Random-weight models of real architectures' shapes are built on the GPU (no download, nothing written to
disk); each variant is its own model object of identical weights. Requests are greedy, ``max_gen_toks``
new tokens each (random weights never stop early), the same contexts and batch size for every variant.
After a warm-up, passes go round-robin over the variants; the best pass of each is reported.

    python benchmarks/generate_bench.py --preset llama-3.2-1b llama-3.1-8b --batch_size 8 --new_tokens 128
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from lm_eval_mx.hf.model import HFMXLM
from lm_eval_mx.hf.testing import PRESETS, _prepare, corpus_dir, randomize_
from lm_eval_mx.kernels import launch

PLAIN = ", JITFunction.run launches"  # variants whose kernels launch through kernel[grid] (launch.FAST off)
VARIANTS = {  # name: MX keys (None: plain hf)
    "hf": None,
    "hf-mx MXFP8 all projections": {"format": "fp8_e4m3"},
    f"hf-mx MXFP8 all projections{PLAIN}": {"format": "fp8_e4m3"},
    "hf-mx MXFP4 mlp_only": {"format": "fp4_e2m1", "mlp_only": True},
    "hf-mx NVFP4 all projections": {"format": "nvfp4"},
}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build(preset: str, device: str) -> tuple[torch.nn.Module, object]:
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(PRESETS[preset])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    tokenizer = _prepare(config)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return randomize_(model, 0.02).eval(), tokenizer


def requests(tokenizer, n: int, context_tokens: int, new_tokens: int, static: bool = False) -> list[Instance]:
    ids = tokenizer(" ".join(p.read_text() for p in sorted(corpus_dir().glob("*.txt"))))["input_ids"]
    ctxs = [tokenizer.decode(ids[i * 131 :][:context_tokens]) for i in range(n)]
    gen = {"until": ["\n\n\n\n"], "max_gen_toks": new_tokens, "do_sample": False,
           **({"cache_implementation": "static"} if static else {})}  # as --gen_kwargs cache_implementation=static
    return [Instance("generate_until", {}, (c, dict(gen)), i) for i, c in enumerate(ctxs)]


def run(lm, reqs: list[Instance], fast: bool = True) -> float:
    launch.FAST = fast
    sync()
    t0 = time.perf_counter()
    lm.generate_until(reqs, disable_tqdm=True)
    sync()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="+", default=["llama-3.2-1b"], choices=sorted(PRESETS))
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--context", type=int, default=200)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--device", default="cuda", help="cuda (the benchmark), or cpu for a quick check of the script")
    p.add_argument("--variants", nargs="+", default=[v for v in VARIANTS if PLAIN not in v], choices=list(VARIANTS))
    p.add_argument("--static", action="store_true",
                   help="transformers' static cache, whose decode step transformers compiles (torch.compile, CUDA graphs)")
    p.add_argument("--out", default=None)
    ns = p.parse_args()
    out = {"device": torch.cuda.get_device_name() if ns.device == "cuda" else "cpu", "torch": torch.__version__,
           "static_cache": ns.static, "batch_size": ns.batch_size,
           "requests": ns.requests, "new_tokens": ns.new_tokens, "presets": {}}
    for preset in ns.preset:
        base, tok = build(preset, ns.device)
        lms = {}
        for name, keys in ((n, VARIANTS[n]) for n in dict.fromkeys(["hf", *ns.variants])):
            model = base if keys is None else copy.deepcopy(base)
            cls = HFLM if keys is None else HFMXLM
            lms[name] = cls(pretrained=model, tokenizer=tok, batch_size=ns.batch_size, max_length=2048,
                            **(keys or {}))
        reqs = requests(tok, ns.requests, ns.context, ns.new_tokens, ns.static)
        for name, lm in lms.items():
            run(lm, reqs[: ns.batch_size], PLAIN not in name)  # warm-up: kernels compiled, allocator warm
        times = {name: [] for name in lms}
        for _ in range(ns.passes):
            for name, lm in lms.items():
                times[name].append(run(lm, reqs, PLAIN not in name))
        launch.FAST = True
        best = {name: min(t) for name, t in times.items()}
        steps = ns.requests // ns.batch_size * ns.new_tokens
        rows = {name: {"seconds": round(t, 3), "ms_per_decode_step": round(1000 * t / steps, 2),
                       "time_ratio": round(t / best["hf"], 3), "all_passes_s": [round(x, 3) for x in times[name]]}
                for name, t in best.items()}
        out["presets"][preset] = rows
        print(json.dumps({preset: rows}, indent=1))
        del lms, base
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if ns.out:
        with open(ns.out, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()

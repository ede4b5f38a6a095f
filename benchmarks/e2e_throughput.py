"""End-to-end tokens/s of hf-mx vs hf through lm-eval's model API (loglikelihood_rolling), one run.

A random-weight model of a real architecture's shapes is built locally (no download);
``hf``, ``hf-mx`` MXFP8 and ``hf-mx`` MXFP4 (all linear roles, backend auto) each score the
same documents with the same batch size, after a warm-up pass; interleaved twice.

    python benchmarks/e2e_throughput.py --preset llama-3.2-1b --docs 64 --tokens 2048 --batch_size 8
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from lm_eval_mx.hf.model import HFMXLM
from lm_eval_mx.hf.testing import PRESETS, corpus_dir, save_random_model


def documents(tokenizer, n: int, tokens: int) -> list[str]:
    """``n`` documents of about ``tokens`` tokens each, cut from the shipped corpus."""
    text = " ".join(p.read_text() for p in sorted(corpus_dir().glob("*.txt")))
    ids = tokenizer(text)["input_ids"]
    while len(ids) < tokens * 2:
        ids = ids + ids
    return [tokenizer.decode(ids[i * 97 % len(ids) :][:tokens]) for i in range(n)]


def score(lm, docs: list[str]) -> tuple[float, int]:
    reqs = [Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(docs)]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    lm.loglikelihood_rolling(reqs, disable_tqdm=True)
    torch.cuda.synchronize()
    return time.perf_counter() - t0, sum(len(lm.tok_encode(d)) for d in docs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-3.2-1b", choices=sorted(PRESETS))
    p.add_argument("--docs", type=int, default=64)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--model_dir", default="/tmp/e2e_model")
    p.add_argument("--out", default=None)
    ns = p.parse_args()
    from transformers import AutoConfig

    if not Path(ns.model_dir, "config.json").exists():
        spec = dict(PRESETS[ns.preset])
        save_random_model(ns.model_dir, AutoConfig.for_model(spec.pop("model_type"), **spec), std=0.02,
                          dtype=torch.bfloat16, device="cuda")
    common = {"pretrained": ns.model_dir, "dtype": "bfloat16", "batch_size": ns.batch_size, "device": "cuda",
              "max_length": ns.tokens}
    models = {
        "hf": HFLM(**common),
        "hf-mx fp8_e4m3": HFMXLM(**common, format="fp8_e4m3"),
        "hf-mx fp4_e2m1": HFMXLM(**common, format="fp4_e2m1"),
    }
    docs = documents(models["hf"].tokenizer, ns.docs, ns.tokens)
    for lm in models.values():  # warm-up: kernels compiled, allocator warm
        score(lm, docs[: ns.batch_size])
    times: dict[str, list[float]] = {k: [] for k in models}
    ntok = 0
    for _ in range(2):
        for name, lm in models.items():
            t, ntok = score(lm, docs)
            times[name].append(t)
    base = min(times["hf"])
    rows = {name: {"seconds": min(t), "tokens_per_s": ntok / min(t), "time_ratio": min(t) / base}
            for name, t in times.items()}
    out = {"device": torch.cuda.get_device_name(), "preset": ns.preset, "docs": ns.docs, "tokens": ntok,
           "batch_size": ns.batch_size, "rows": rows}
    print(json.dumps(out, indent=1))
    if ns.out:
        Path(ns.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

"""Wall time of ``lm-eval-mx search`` on a random Llama-3.2-1B-shaped model (16 blocks, 112 linear layers),
split into load / measurement / solve / final measure.

    python benchmarks/search_bench.py                                   # CUDA: llama-3.2-1b, 3 formats, 8192 tokens
    python benchmarks/search_bench.py --preset tiny-llama --device cpu --max_tokens 512     # CPU smoke run

The model has the preset's shapes and random weights (std 0.02, bf16 on CUDA); its vocabulary is the real
model's (128,256 for Llama-3.2) so that the LM head and the log-softmax over the vocabulary cost what they
cost on the real model, while the local tokenizer (:mod:`lm_eval_mx.hf.testing`) only produces its first 320 ids.
The shipped corpus holds about 4,800 tokens of the local tokenizer, so the benchmark measures on the corpus
repeated until it holds ``--max_tokens``. Measurement = baseline log-probabilities + every (layer, candidate)
pass + the uniform mixes.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from lm_eval_mx.commands.cli import main as cli_main
from lm_eval_mx.hf.testing import PRESETS, _prepare, corpus_dir, randomize_

REAL_VOCAB = {"llama-3.2-1b": 128256, "llama-3.1-8b": 128256}


def build(preset: str, path: Path, dtype: torch.dtype, device: str, vocab: int | None) -> int:
    """Write a random model of ``preset`` with the local tokenizer; returns its vocabulary size."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(PRESETS[preset])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    tokenizer = _prepare(config)
    if vocab:
        config.vocab_size = vocab
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    randomize_(model, std=0.02)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return config.vocab_size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-3.2-1b", choices=sorted(PRESETS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--candidates", default="fp4_e2m1,fp6_e2m3,fp8_e4m3", help="3 measured formats by default")
    p.add_argument("--bits", default="6")
    p.add_argument("--granularity", default="layer", choices=("layer", "block"))
    p.add_argument("--max_tokens", type=int, default=8192)
    p.add_argument("--batch_size", type=int, default=8, help="sequences of 256 tokens per batch")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the real model's)")
    p.add_argument("--out", default=None, help="also write the timings as JSON here")
    ns = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dtype = torch.bfloat16 if ns.device.startswith("cuda") else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        vocab = build(ns.preset, Path(tmp) / "model", dtype, ns.device, ns.vocab or REAL_VOCAB.get(ns.preset))
        build_s = time.perf_counter() - t0
        corpus = Path(tmp) / "corpus.txt"
        texts = [p.read_text() for p in sorted(corpus_dir().glob("*.txt"))]
        corpus.write_text("\n\n".join(texts * max(1, -(-ns.max_tokens // 4000))))  # ~4,800 tokens per copy
        recipe_path = Path(tmp) / "recipe.json"
        t0 = time.perf_counter()
        cli_main(["search", "--model_args", f"pretrained={tmp}/model,dtype={str(dtype).split('.')[1]}",
                  "--candidates", ns.candidates, "--bits", ns.bits, "--granularity", ns.granularity,
                  "--max_tokens", str(ns.max_tokens), "--batch_size", str(ns.batch_size), "--device", ns.device,
                  "--corpus", str(corpus), "--output", str(recipe_path)])
        wall = time.perf_counter() - t0
        recipe = json.loads(recipe_path.read_text())
    timing = recipe["timing_s"]
    units = len(recipe["sensitivities"])
    measured = len([f for f in recipe["candidates"] if f != "bf16"])
    result = {
        "preset": ns.preset, "device": torch.cuda.get_device_name() if ns.device.startswith("cuda") else "cpu",
        "dtype": str(dtype), "vocab": vocab, "units": units, "granularity": ns.granularity,
        "candidates": recipe["candidates"], "passes": units * measured, "tokens": recipe["corpus_tokens"],
        "build_model_s": round(build_s, 2), "search_wall_s": round(wall, 2),
        **{k: round(v, 2) for k, v in timing.items()},
        "avg_bits": recipe["avg_bits"], "predicted_kl": recipe["predicted_kl"], "measured_kl": recipe["measured_kl"],
    }
    print(f"\n{ns.preset} on {result['device']}: {units} {ns.granularity}s x {measured} formats = "
          f"{result['passes']} passes over {result['tokens']} tokens")
    print(f"search wall {wall:.1f} s = load {timing['load_s']:.1f} + measurement {timing['measure_s']:.1f} + "
          f"solve {timing['solve_s']:.3f} + final measure {timing.get('final_measure_s', 0):.1f} (+ printing)")
    print(json.dumps(result))
    if ns.out:
        Path(ns.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

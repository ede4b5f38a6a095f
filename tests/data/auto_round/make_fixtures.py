"""Write the auto-round fixtures of tests/test_auto_round.py with auto-round itself, and its runtime's logits.

Run with auto-round 0.16.1 (torch 2.13.0 CPU, transformers 5.25.0), from the repository root:

    /work/venvs/autoround/bin/python tests/data/auto_round/make_fixtures.py

For each scheme (MXFP4, MXFP8, NVFP4: auto-round's packing format ``auto_round:llm_compressor``; W4A16: its int
format, which hf-mx refuses) it quantizes a tiny random Llama (hidden 64, 2 layers, vocabulary 320, locally
trained tokenizer) with ``AutoRound(..., iters=0)`` (RTN) on four local calibration texts, saves it with
``format="auto_round"``, loads it back with transformers (auto-round's own inference backend:
``auto_round.inference`` converts the layers to its ``experimental.qmodules`` QuantLinear classes) in float32
and in bfloat16 on CPU and stores the logits on the fixed ids below in ``<scheme>/runtime_logits.safetensors``
(``logits``, ``logits_bf16``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
IDS = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))
TEXTS = ["The quick brown fox jumps over the lazy dog. " * 8, "A tiny model is quantized here on a CPU. " * 8,
         "Numbers 0 1 2 3 4 5 6 7 8 9 and letters a b c d e f. " * 6, "Once upon a time there was a cat. " * 8]


def source(path: str) -> str:
    """The tiny bf16 Llama every fixture quantizes (this project's own random-model helper)."""
    sys.path.insert(0, ROOT)
    from transformers import LlamaConfig

    from lm_eval_mx.hf.testing import save_random_model

    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=320, max_position_embeddings=64)
    return save_random_model(path, cfg, seed=0, dtype=torch.bfloat16)


def main() -> None:
    import auto_round
    import transformers
    from auto_round import AutoRound
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    src = source("/tmp/ar_fixture_src")
    versions = {"auto-round": auto_round.__version__, "torch": torch.__version__,
                "transformers": transformers.__version__}
    for scheme in sys.argv[1:] or ["MXFP4", "MXFP8", "NVFP4", "W4A16"]:
        out = os.path.join(HERE, scheme.lower())
        shutil.rmtree(out, ignore_errors=True)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
        tok = AutoTokenizer.from_pretrained(src)
        ar = AutoRound(model, tok, scheme=scheme, iters=0, dataset=TEXTS, seqlen=32, nsamples=4, batch_size=1,
                       device_map="cpu")
        ar.quantize_and_save(out, format="auto_round")
        (sub,) = [d for d in os.listdir(out) if os.path.isdir(os.path.join(out, d))]  # it adds a folder
        for f in os.listdir(os.path.join(out, sub)):
            shutil.move(os.path.join(out, sub, f), out)
        os.rmdir(os.path.join(out, sub))
        if scheme == "W4A16":  # only its refusal is tested; auto-round 0.16.1's CPU runtime ("auto_round:fake"
            # backend, FakeActQuantLinear) fails on it here with "TypeError: unsupported operand type(s) for +:
            # 'NoneType' and 'str'" (get_quant_func with act_data_type None): no runtime logits
            continue
        back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, device_map="cpu").eval()
        layers = sorted({type(m).__module__ + "." + type(m).__name__ for m in back.modules()
                         if "QuantLinear" in type(m).__name__})
        back_bf16 = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16, device_map="cpu").eval()
        with torch.no_grad():
            logits = back(IDS).logits
            logits_bf16 = back_bf16(IDS).logits
        save_file({"ids": IDS, "logits": logits.contiguous(), "logits_bf16": logits_bf16.contiguous()},
                  os.path.join(out, "runtime_logits.safetensors"))
        with open(os.path.join(out, "runtime.json"), "w") as f:
            json.dump({"versions": versions, "runtime_layers": layers, "dtype": "float32 (logits), bfloat16 "
                       "(logits_bf16)", "device": "cpu"}, f, indent=1)
        print(scheme, layers, logits.abs().mean().item())


if __name__ == "__main__":
    main()

"""Write the llm-compressor fixtures of tests/test_shipped.py with llm-compressor itself, and the runtime's logits.

Run with llmcompressor 0.14.0.1 (compressed-tensors 0.19.0, transformers 5.17.0, torch 2.13.0 CPU), from the
repository root:

    /work/venvs/llmcompressor/bin/python tests/data/llmcompressor/make_fixtures.py [NAME ...]

Each fixture is a tiny random model (hidden 64, 2 layers, vocabulary 320, embeddings tied, float32, this project's locally trained
tokenizer) quantized by ``oneshot`` with a ``QuantizationModifier`` preset on four local calibration texts and saved
compressed (``save_pretrained(save_compressed=True)``). Runtime logits (``runtime_logits.safetensors``, float32, on
the fixed ids below): the calibrated model as compressed-tensors runs it right after ``oneshot`` (its forward
fake-quantizes weights and input activations with the calibrated scales), cast to float32. For dense models the
saved checkpoint is also loaded back with transformers (compressed-tensors' decompression, float32) and its logits
recorded as ``reload_logits`` .
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
_TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=320, max_position_embeddings=64, tie_word_embeddings=True)
MOE_IGNORE = ["lm_head", "re:.*mlp.gate$", "re:.*shared_expert_gate$"]
# name: (architecture, preset, ignore)
FIXTURES = {
    "nvfp4": ("llama", "NVFP4", ["lm_head"]),
    "nvfp4a16": ("llama", "NVFP4A16", ["lm_head"]),
    "mxfp4": ("llama", "MXFP4", ["lm_head"]),
    "mxfp8": ("llama", "MXFP8", ["lm_head"]),
    # Mixtral and Qwen3-MoE NVFP4, Qwen2-MoE MXFP4: tests/data/moe (tests/data/make_moe_fixtures.py)
    "qwen2_moe_nvfp4": ("qwen2_moe", "NVFP4", MOE_IGNORE),
}


def config(arch: str):
    import transformers as tf

    if arch == "llama":
        return tf.LlamaConfig(**_TINY)
    return tf.Qwen2MoeConfig(**_TINY, moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=4,
                             num_experts_per_tok=2)


def source(arch: str) -> str:
    sys.path.insert(0, ROOT)
    from lm_eval_mx.hf.testing import save_random_model

    return save_random_model(f"/tmp/lc_fixture_src_{arch}", config(arch), seed=0, dtype=torch.float32)


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float().contiguous()


def main() -> None:
    import compressed_tensors
    import llmcompressor
    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    versions = {"llmcompressor": llmcompressor.__version__, "compressed-tensors": compressed_tensors.__version__,
                "transformers": transformers.__version__, "torch": torch.__version__}
    for name in sys.argv[1:] or list(FIXTURES):
        arch, preset, ignore = FIXTURES[name]
        src = source(arch)
        out = os.path.join(HERE, name)
        shutil.rmtree(out, ignore_errors=True)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(src)
        ds = Dataset.from_dict({"text": TEXTS})
        oneshot(model=model, tokenizer=tok, dataset=ds, recipe=QuantizationModifier(targets="Linear", scheme=preset,
                ignore=ignore), max_seq_length=32, num_calibration_samples=len(TEXTS), pipeline="basic")
        tensors = {"ids": IDS, "logits": logits_of(model)}
        model.save_pretrained(out, save_compressed=True)
        tok.save_pretrained(out)
        info = {"versions": versions, "preset": preset, "ignore": ignore, "architecture": arch,
                "logits": "the calibrated float32 model right after oneshot (compressed-tensors' forward)"}
        if arch == "llama":
            try:
                back = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
                tensors["reload_logits"] = logits_of(back)
            except RuntimeError as e:  # recorded: the reload is the tool's, not this project's
                info["reload_error"] = f"{type(e).__name__}: {e}"
            else:
                info["reload_logits"] = "the saved checkpoint loaded back by transformers in float32"
                info["reload_equal"] = bool(torch.equal(tensors["reload_logits"], tensors["logits"]))
                info["reload_max_abs_diff"] = (tensors["reload_logits"] - tensors["logits"]).abs().max().item()
        save_file(tensors, os.path.join(out, "runtime_logits.safetensors"))
        with open(os.path.join(out, "runtime.json"), "w") as f:
            json.dump(info, f, indent=1)
        print(name, info)


if __name__ == "__main__":
    main()

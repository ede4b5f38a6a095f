"""Write tests/data/gptoss_mxfp4/: a tiny gpt-oss checkpoint as OpenAI ships gpt-oss (``quant_method: mxfp4``, MoE
experts as ``*_blocks``/``*_scales``), and transformers' own logits for it.

Run with this project's venv (the tool is transformers itself; written with transformers 5.25.0, torch 2.13.0 CPU)::

    OMP_NUM_THREADS=1 python tests/data/make_gptoss_fixture.py

The checkpoint: a GptOssConfig of gpt-oss's structure at tiny size (hidden 64, intermediate 64, 4 experts, top-2,
2 layers (one sliding, one full attention), 4 heads of 16, vocab 64); every tensor gpt-oss stores in bf16 (attention
with biases and sinks, router weight and bias, norms, embeddings, lm_head, expert biases) random normal; the experts'
weights stored as gpt-oss stores them: ``gate_up_proj_blocks`` uint8 [E, 2I, H/32, 16] (random bytes: random FP4
codes) with ``gate_up_proj_scales`` uint8 [E, 2I, H/32] (random E8M0 exponents 118..129), ``down_proj_blocks``
[E, H, I/32, 16] and ``down_proj_scales`` [E, H, I/32]; config.json's ``quantization_config`` is gpt-oss's
(``{"quant_method": "mxfp4", "modules_to_not_convert": [attention, router, embeddings, lm_head]}``).

``transformers_logits.safetensors``: ``ids`` [2, 10] and ``logits`` float32 from transformers' own load of the
checkpoint, ``AutoModelForCausalLM.from_pretrained(dir, quantization_config=Mxfp4Config(dequantize=True),
dtype=torch.float32)`` (its ``convert_moe_packed_tensors`` decodes the experts), eager attention.
"""

from __future__ import annotations

import json
import os
import sys

import torch

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gptoss_mxfp4")
VOCAB, HIDDEN, INTER, EXPERTS = 64, 64, 64, 4
IDS = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(77))
NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


def config():
    from transformers import GptOssConfig

    return GptOssConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=EXPERTS,
                        num_experts_per_tok=2, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                        max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0, eos_token_id=0,
                        rope_parameters={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32,
                                         "rope_theta": 150000.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                         "truncate": False})


def tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """gpt-oss's stored tensors for ``model``'s names: experts as blocks/scales, everything else bf16."""
    g = torch.Generator().manual_seed(0)
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        owner, _, leaf = name.rpartition(".")
        if owner.endswith("mlp.experts") and leaf in ("gate_up_proj", "down_proj"):
            n, k = p.shape[2], p.shape[1]  # transformers holds [E, K, N] (x @ W); stored [E, N, K/32, 16]
            out[f"{name}_blocks"] = torch.randint(0, 256, (EXPERTS, n, k // 32, 16), generator=g, dtype=torch.uint8)
            out[f"{name}_scales"] = torch.randint(118, 130, (EXPERTS, n, k // 32), generator=g, dtype=torch.uint8)
        else:
            scale = 1.0 if "norm" in leaf or "norm" in owner else 0.2
            t = torch.randn(p.shape, generator=g) * scale + (1.0 if "norm" in owner else 0.0)
            out[name] = t.to(torch.bfloat16)
    return out


def main() -> None:
    import transformers
    from accelerate import init_empty_weights
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, Mxfp4Config

    os.makedirs(HERE, exist_ok=True)
    cfg = config()
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(cfg)
    save_file(tensors(skeleton), os.path.join(HERE, "model.safetensors"), metadata={"format": "pt"})
    cfg.quantization_config = {"quant_method": "mxfp4", "modules_to_not_convert": NOT_CONVERTED}
    cfg.dtype = "bfloat16"
    cfg.save_pretrained(HERE)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from make_moe_fixtures import tokenizer  # the same word-level tokenizer of 64 ids, for lm-eval

    tokenizer().save_pretrained(HERE)
    model = AutoModelForCausalLM.from_pretrained(HERE, quantization_config=Mxfp4Config(dequantize=True),
                                                 dtype=torch.float32, attn_implementation="eager").eval()
    stored = load_file(os.path.join(HERE, "model.safetensors"))
    assert torch.equal(model.model.layers[0].mlp.router.weight, stored["model.layers.0.mlp.router.weight"].float())
    with torch.no_grad():
        logits = model(IDS).logits
    save_file({"ids": IDS.contiguous(), "logits": logits.contiguous()},
              os.path.join(HERE, "transformers_logits.safetensors"))
    with open(os.path.join(HERE, "tool.json"), "w") as f:
        json.dump({"tool": "transformers", "transformers": transformers.__version__, "torch": torch.__version__,
                   "logits": "from_pretrained(quantization_config=Mxfp4Config(dequantize=True), dtype=float32, "
                             "attn_implementation=eager)"}, f, indent=1)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()

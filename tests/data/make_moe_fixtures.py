"""Write the MoE fixtures under tests/data/moe/ with the quantizing tools themselves, and their own runtime logits.

Two tools, each in its own venv (not this project's), on tiny MoE models built here (hidden 64, 2 layers, 4 experts,
top-2, float32, seeded):

* llm-compressor 0.14.0.1 (compressed-tensors 0.19.0, transformers 5.17.0, torch 2.13.0 CPU)::

      OMP_NUM_THREADS=1 /work/venvs/llmcompressor/bin/python tests/data/make_moe_fixtures.py llmcompressor

  Mixtral NVFP4 (W4A4), Qwen3-MoE NVFP4, Qwen2-MoE MXFP4: the experts linearized by llm-compressor
  (``linearize_moe``), ``oneshot`` with a ``QuantizationModifier`` on seeded random calibration ids, the model's
  float32 logits on fixed ids taken right after (compressed-tensors' own fake-quantized forward: the tool's runtime),
  then ``save_pretrained(save_compressed=True)``;
* nvidia-modelopt 0.47.0 (transformers 5.14.1, torch 2.13.0 CPU)::

      OMP_NUM_THREADS=1 /work/venvs/modelopt/bin/python tests/data/make_moe_fixtures.py modelopt

  Mixtral NVFP4: ``mtq.quantize(model, NVFP4_DEFAULT_CFG, forward_loop)`` on the same kind of calibration ids, the
  quantized model's float32 logits on the fixed ids (ModelOpt's fake-quant forward), then ModelOpt's own
  ``export_hf_checkpoint``.

Each directory holds the checkpoint (config.json, model.safetensors, ...) and ``tool_logits.safetensors``: ``ids``
[1, 12] and ``logits`` [1, 12, vocab] float32, with ``tool.json`` naming the tool, its version and the recipe.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import torch

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "moe")
VOCAB = 64
IDS = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(4321))


def tiny(arch: str):
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, initializer_range=0.1, tie_word_embeddings=False)
    if arch == "mixtral":
        cfg = tf.MixtralConfig(**common, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)
    elif arch == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**common, intermediate_size=64, moe_intermediate_size=32, head_dim=16, num_experts=4,
                                num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[])
    else:
        cfg = tf.Qwen2MoeConfig(**common, intermediate_size=64, moe_intermediate_size=32,
                                shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # HF initialises the experts' 3-D weights and norms to constants: give them values
        for p in model.parameters():
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    return model


def tokenizer():
    """A word-level tokenizer of the 64 ids (``t0`` ... ``t63``; ``t0`` is end of text), saved beside each checkpoint
    so that lm-eval can load it; the tools need one to exist, and calibrate on ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t0", unk_token="t1", pad_token="t0")


def calibration() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, VOCAB, (1, 32), generator=g) for _ in range(8)]


def _save_logits(out: str, logits: torch.Tensor, tool: dict) -> None:
    from safetensors.torch import save_file

    save_file({"ids": IDS.contiguous(), "logits": logits.float().contiguous()},
              os.path.join(out, "tool_logits.safetensors"))
    with open(os.path.join(out, "tool.json"), "w") as f:
        json.dump(tool, f, indent=1)


def llmcompressor() -> None:
    import compressed_tensors
    import datasets
    import llmcompressor as llmc
    import transformers
    from llmcompressor import oneshot
    from llmcompressor.modeling.moe.linearize import linearize_moe
    from llmcompressor.modifiers.quantization import QuantizationModifier

    ignore = ["lm_head", "re:.*mlp.gate$", "re:.*shared_expert_gate$"]
    for arch, scheme in (("mixtral", "NVFP4"), ("qwen3_moe", "NVFP4"), ("qwen2_moe", "MXFP4")):
        out = os.path.join(HERE, f"llmc_{arch}_{scheme.lower()}")
        base = tempfile.mkdtemp()  # oneshot reads the config from the model's path
        tiny(arch).save_pretrained(base)
        model = linearize_moe(transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32))
        ids = calibration()
        ds = datasets.Dataset.from_dict({"input_ids": [i[0].tolist() for i in ids],
                                         "attention_mask": [[1] * i.shape[1] for i in ids]})
        tok = tokenizer()
        oneshot(model=model, processor=tok, dataset=ds,
                recipe=QuantizationModifier(targets="Linear", scheme=scheme, ignore=ignore),
                num_calibration_samples=len(ids), max_seq_length=32)
        with torch.no_grad():
            logits = model(IDS).logits
        model.save_pretrained(out, save_compressed=True)
        tok.save_pretrained(out)
        _save_logits(out, logits, {"tool": "llm-compressor", "llmcompressor": llmc.__version__,
                                   "compressed-tensors": compressed_tensors.__version__,
                                   "transformers": transformers.__version__, "torch": torch.__version__,
                                   "recipe": f"QuantizationModifier(targets='Linear', scheme='{scheme}', "
                                             f"ignore={ignore}) after linearize_moe",
                                   "logits": "the oneshot model's float32 forward (compressed-tensors fake quant)"})


def modelopt() -> None:
    import modelopt
    import modelopt.torch.quantization as mtq
    import transformers
    from modelopt.torch.export import export_hf_checkpoint

    out = os.path.join(HERE, "modelopt_mixtral_nvfp4")
    model = tiny("mixtral")
    ids = calibration()

    def forward_loop(m):
        for i in ids:
            m(i)

    mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, forward_loop)
    with torch.no_grad():
        logits = model(IDS).logits
    export_hf_checkpoint(model, export_dir=out)
    tokenizer().save_pretrained(out)
    _save_logits(out, logits, {"tool": "nvidia-modelopt", "modelopt": modelopt.__version__,
                               "transformers": transformers.__version__, "torch": torch.__version__,
                               "recipe": "mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, forward_loop); "
                                         "export_hf_checkpoint",
                               "logits": "the quantized model's float32 forward (ModelOpt fake quant)"})


if __name__ == "__main__":
    torch.set_num_threads(1)
    {"llmcompressor": llmcompressor, "modelopt": modelopt}[sys.argv[1]]()

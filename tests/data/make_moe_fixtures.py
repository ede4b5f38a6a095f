"""Write the MoE fixtures under tests/data/moe/ with the quantizing tools themselves, and their own runtime logits.

Two tools, each in its own venv (not this project's), on tiny MoE models built here (hidden 64, 2 layers, 4 experts,
top-2, float32, seeded):

* llm-compressor 0.14.0.1 (compressed-tensors 0.19.0, transformers 5.17.0, torch 2.13.0 CPU)::

      OMP_NUM_THREADS=1 /work/venvs/llmcompressor/bin/python tests/data/make_moe_fixtures.py llmcompressor
      OMP_NUM_THREADS=1 /work/venvs/llmcompressor/bin/python tests/data/make_moe_fixtures.py llmcompressor_mixed

  Mixtral NVFP4 (W4A4), Qwen3-MoE NVFP4, Qwen2-MoE MXFP4: the experts linearized by llm-compressor
  (``linearize_moe``), ``oneshot`` with a ``QuantizationModifier`` on seeded random calibration ids, the model's
  float32 logits on fixed ids taken right after (compressed-tensors' own fake-quantized forward: the tool's runtime),
  then ``save_pretrained(save_compressed=True)``; and a mixed recipe (``llmcompressor_mixed``): Qwen3-MoE with two
  config groups, attention NVFP4 (W4A4) and the experts MXFP4A16;
* nvidia-modelopt 0.47.0 (transformers 5.14.1, torch 2.13.0 CPU)::

      OMP_NUM_THREADS=1 /work/venvs/modelopt/bin/python tests/data/make_moe_fixtures.py modelopt

  Mixtral NVFP4: ``mtq.quantize(model, NVFP4_DEFAULT_CFG, forward_loop)`` on the same kind of calibration ids, the
  calibration (ModelOpt's fake quant, its CUDA-only NVFP4 kernel replaced on CPU by ModelOpt's own torch NVFP4 round
  trip: ``_nvfp4_fake_quant_on_cpu``), ModelOpt's own ``export_hf_checkpoint``, then the exported checkpoint's
  logits by ModelOpt's own NVFP4 functions (``_modelopt_reference``: its export requantizes w1/w3 to one
  ``weight_scale_2``, so the pre-export forward is not the checkpoint's).

Each directory holds the checkpoint (config.json, model.safetensors, ...) and ``tool_logits.safetensors``: ``ids``
[1, 12] and ``logits`` [1, 12, vocab] float32 (ModelOpt's also ``logits_weight_only``), with ``tool.json`` naming the
tool, its version, the recipe and how the logits were computed.
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
    model.config.architectures = [type(model).__name__]  # as a saved checkpoint states it (ModelOpt's export reads it)
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


def _save_logits(out: str, logits: torch.Tensor, tool: dict, **more: torch.Tensor) -> None:
    from safetensors.torch import save_file

    save_file({"ids": IDS.contiguous(), "logits": logits.float().contiguous(),
               **{k: v.float().contiguous() for k, v in more.items()}}, os.path.join(out, "tool_logits.safetensors"))
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


def llmcompressor_mixed() -> None:
    """A mixed recipe: Qwen3-MoE with attention NVFP4 (W4A4) and the experts MXFP4A16, two config groups."""
    import compressed_tensors
    import datasets
    import llmcompressor as llmc
    import transformers
    from compressed_tensors.quantization import QuantizationScheme, preset_name_to_scheme
    from llmcompressor import oneshot
    from llmcompressor.modeling.moe.linearize import linearize_moe
    from llmcompressor.modifiers.quantization import QuantizationModifier

    out = os.path.join(HERE, "llmc_qwen3_moe_mixed")
    base = tempfile.mkdtemp()
    tiny("qwen3_moe").save_pretrained(base)
    model = linearize_moe(transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32))
    groups = {"attention_nvfp4": ("NVFP4", ["re:.*self_attn.*_proj$"]),
              "experts_mxfp4a16": ("MXFP4A16", ["re:.*mlp.experts.*_proj$"])}
    config_groups = {g: QuantizationScheme(targets=t, **preset_name_to_scheme(p, t).model_dump(exclude={"targets"}))
                     for g, (p, t) in groups.items()}
    ids = calibration()
    ds = datasets.Dataset.from_dict({"input_ids": [i[0].tolist() for i in ids],
                                     "attention_mask": [[1] * i.shape[1] for i in ids]})
    tok = tokenizer()
    oneshot(model=model, processor=tok, dataset=ds, recipe=QuantizationModifier(config_groups=config_groups),
            num_calibration_samples=len(ids), max_seq_length=32)
    with torch.no_grad():
        logits = model(IDS).logits
    model.save_pretrained(out, save_compressed=True)
    tok.save_pretrained(out)
    _save_logits(out, logits, {"tool": "llm-compressor", "llmcompressor": llmc.__version__,
                               "compressed-tensors": compressed_tensors.__version__,
                               "transformers": transformers.__version__, "torch": torch.__version__,
                               "recipe": f"QuantizationModifier(config_groups={groups}) after linearize_moe",
                               "logits": "the oneshot model's float32 forward (compressed-tensors fake quant)"})


def _nvfp4_fake_quant_on_cpu() -> None:
    """ModelOpt's NVFP4 fake quantization runs only as a CUDA kernel (``dynamic_block_quantize_op`` asserts a CUDA
    amax); on CPU it is replaced by ModelOpt's own NVFP4 arithmetic in torch, its real-quantization round trip
    ``NVFP4QTensor.quantize`` -> ``dequantize`` with the per-tensor scale ``amax / (6·448)`` (what the kernel takes
    from the same amax). Everything else (quantizer placement, calibration, export) is ModelOpt's as it runs."""
    import modelopt.torch.quantization.tensor_quant as tq
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    def nvfp4(inputs, block_size, amax, num_bits, exponent_bits, scale_num_bits, scale_exponent_bits):
        if (num_bits, exponent_bits, scale_num_bits, scale_exponent_bits) != (4, 2, 8, 4):
            raise NotImplementedError("only NVFP4 (E2M1 elements, E4M3 scales) is replaced on CPU")
        q, scale, scale_2 = NVFP4QTensor.quantize(inputs, block_size,
                                                  weights_scaling_factor_2=amax.float().reshape(()) / (6.0 * 448.0))
        return q.dequantize(dtype=inputs.dtype, scale=scale, double_scale=scale_2, block_sizes={-1: block_size})

    tq.dynamic_block_quantize_op = nvfp4


def _modelopt_reference(out: str, activations: bool = True) -> torch.Tensor:
    """Logits of ModelOpt's export ``out`` by ModelOpt's own NVFP4 functions: the tiny Mixtral (same seed) with each
    quantized weight replaced by ``NVFP4QTensor.dequantize`` of its stored tensors (experts: w1 and w3 concatenated
    into gate_up_proj[e], w2 into down_proj[e], as transformers fuses them) and each quantized layer's input put
    through ``NVFP4QTensor`` quantize -> dequantize with the stored ``input_scale`` as its per-tensor scale."""
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor
    from safetensors.torch import load_file

    stored = load_file(os.path.join(out, "model.safetensors"))

    def weight(prefix: str) -> torch.Tensor:
        w = stored[f"{prefix}.weight"]
        q = NVFP4QTensor(torch.Size((w.shape[0], w.shape[1] * 2)), torch.float32, w)
        return q.dequantize(dtype=torch.float32, scale=stored[f"{prefix}.weight_scale"],
                            double_scale=stored[f"{prefix}.weight_scale_2"], block_sizes={-1: 16})

    def act(x: torch.Tensor, prefix: str) -> torch.Tensor:
        q, scale, scale_2 = NVFP4QTensor.quantize(x, 16, weights_scaling_factor_2=stored[f"{prefix}.input_scale"])
        return q.dequantize(dtype=x.dtype, scale=scale, double_scale=scale_2, block_sizes={-1: 16})

    model = tiny("mixtral")
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and f"{name}.weight_scale" in stored:
            m.weight.data = weight(name)
            if activations:
                m.register_forward_pre_hook(lambda _, a, n=name: (act(a[0], n),))
        if type(m).__name__ == "MixtralExperts":
            p = name.replace(".mlp.", ".block_sparse_moe.")
            for e in range(m.gate_up_proj.shape[0]):
                m.gate_up_proj.data[e] = torch.cat([weight(f"{p}.{e}.w1"), weight(f"{p}.{e}.w3")])
                m.down_proj.data[e] = weight(f"{p}.{e}.w2")
            if activations:  # one input_scale per projection, the same for every expert (expert 0's here)
                m.register_forward_pre_hook(lambda _, a, p=p: (act(a[0], f"{p}.0.w1"), *a[1:]))
                _quantize_down_inputs(m, lambda x, p=p: act(x, f"{p}.0.w2"))
    return model(IDS).logits


def _quantize_down_inputs(experts: torch.nn.Module, quantize) -> None:
    """transformers' fused experts compute ``linear(act_fn(gate) * up, down_proj[e])``: quantize that input (the
    one ``F.linear`` call of the experts' forward whose weight has the intermediate size as its input size)."""
    forward = experts.forward

    def wrapped(*args, **kwargs):
        import torch.nn.functional as F

        linear = F.linear

        def quantized_linear(x, w, b=None):
            return linear(quantize(x) if w.shape[1] == experts.down_proj.shape[2] else x, w, b)

        F.linear = quantized_linear
        try:
            return forward(*args, **kwargs)
        finally:
            F.linear = linear

    experts.forward = wrapped


def modelopt() -> None:
    import modelopt
    import modelopt.torch.quantization as mtq
    import transformers
    from modelopt.torch.export import export_hf_checkpoint

    _nvfp4_fake_quant_on_cpu()
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
    with torch.no_grad():
        exported, weight_only = _modelopt_reference(out), _modelopt_reference(out, activations=False)
    _save_logits(out, exported, {
        "tool": "nvidia-modelopt", "modelopt": modelopt.__version__, "transformers": transformers.__version__,
        "torch": torch.__version__,
        "recipe": "mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, forward_loop); export_hf_checkpoint",
        "logits": "the exported checkpoint evaluated with ModelOpt's own NVFP4 arithmetic: weights "
                  "NVFP4QTensor.dequantize of the stored tensors, each quantized layer's input NVFP4QTensor "
                  "quantize->dequantize with the stored input_scale, float32 (ModelOpt's export requantizes w1/w3 "
                  "to one weight_scale_2, so its pre-export fake-quant forward is not the checkpoint's)",
        "logits_weight_only": "the same without the inputs' quantization",
        "pre_export_fake_quant_max_abs_diff": (logits - exported).abs().max().item()}, logits_weight_only=weight_only)


if __name__ == "__main__":
    torch.set_num_threads(1)
    {"llmcompressor": llmcompressor, "llmcompressor_mixed": llmcompressor_mixed, "modelopt": modelopt}[sys.argv[1]]()

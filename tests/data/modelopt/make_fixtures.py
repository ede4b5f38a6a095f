"""Write the ModelOpt fixtures of tests/test_shipped.py with NVIDIA ModelOpt itself, and its runtime's logits.

Run with nvidia-modelopt 0.47.0 (torch 2.13.0 CPU, transformers 5.14.1), from the repository root:

    /work/venvs/modelopt/bin/python tests/data/modelopt/make_fixtures.py [NAME ...]

Each fixture is a tiny random model (hidden 64, 2 layers, vocabulary 320, embeddings tied, float32, this project's
locally trained tokenizer) quantized by ``mtq.quantize`` with ``NVFP4_DEFAULT_CFG`` or ``W4A16_NVFP4_CFG`` (a
forward loop over four local calibration texts) and exported by ``export_hf_checkpoint``. Logits of the
quantized model as ModelOpt runs it before
export cannot be computed on CPU: ModelOpt 0.47's NVFP4 fake quantization asserts a CUDA tensor
(``_dynamic_block_quantize_impl``). What is stored instead (:func:`reference_logits`): ``weight_only_logits``, the
source model with each exported weight decoded by ModelOpt's own ``NVFP4QTensor.dequantize`` (CPU, float32), inputs
unquantized (the W4A16 checkpoint's whole recipe); for NVFP4 also ``logits``, the inputs put through ModelOpt's
``NVFP4QTensor`` quantize -> dequantize round trip with the stored ``input_scale``.
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
FIXTURES = {"nvfp4": ("llama", "NVFP4_DEFAULT_CFG"), "w4a16_nvfp4": ("llama", "W4A16_NVFP4_CFG")}
# Mixtral NVFP4 by ModelOpt: tests/data/moe/modelopt_mixtral_nvfp4 (tests/data/make_moe_fixtures.py)


def source(arch: str) -> str:
    import transformers as tf

    sys.path.insert(0, ROOT)
    from lm_eval_mx.hf.testing import save_random_model

    return save_random_model(f"/tmp/mo_fixture_src_{arch}", tf.LlamaConfig(**_TINY), seed=0, dtype=torch.float32)


def reference_logits(src: str, out: str, activations: bool) -> torch.Tensor:
    """The source model with each exported weight replaced by ModelOpt's ``NVFP4QTensor.dequantize`` of its stored
    tensors and, with ``activations``, each quantized layer's input through ``NVFP4QTensor.quantize`` ->
    ``dequantize`` with the stored ``input_scale`` as its per-tensor scale (ModelOpt's own NVFP4 arithmetic in
    torch; its fake-quant kernel is CUDA only)."""
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    stored = load_file(os.path.join(out, "model.safetensors"))
    params, modules = dict(model.named_parameters()), dict(model.named_modules())

    def act(x: torch.Tensor, scale_2: torch.Tensor) -> torch.Tensor:
        q, scale, s2 = NVFP4QTensor.quantize(x, 16, weights_scaling_factor_2=scale_2)
        return q.dequantize(dtype=x.dtype, scale=scale, double_scale=s2, block_sizes={-1: 16})

    with torch.no_grad():
        for key, t in stored.items():
            if key.endswith(".weight_scale_2"):
                name = key.removesuffix(".weight_scale_2")
                packed = stored[f"{name}.weight"]
                shape = torch.Size((packed.shape[0], packed.shape[1] * 2))
                params[f"{name}.weight"].copy_(NVFP4QTensor(shape, torch.float32, packed).dequantize(
                    dtype=torch.float32, scale=stored[f"{name}.weight_scale"], double_scale=t, block_sizes={-1: 16}))
                if activations and f"{name}.input_scale" in stored:
                    scale_2 = stored[f"{name}.input_scale"]
                    modules[name].register_forward_pre_hook(lambda _, a, s=scale_2: (act(a[0], s),))
            elif key in params and t.is_floating_point():
                params[key].copy_(t.float())
        return model(IDS).logits.float().contiguous()


def main() -> None:
    import modelopt
    import modelopt.torch.quantization as mtq
    import transformers
    from modelopt.torch.export import export_hf_checkpoint
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    versions = {"nvidia-modelopt": modelopt.__version__, "transformers": transformers.__version__,
                "torch": torch.__version__}
    for name in sys.argv[1:] or list(FIXTURES):
        arch, cfg_name = FIXTURES[name]
        src = source(arch)
        out = os.path.join(HERE, name)
        shutil.rmtree(out, ignore_errors=True)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        tok = AutoTokenizer.from_pretrained(src)
        batches = [tok(t, return_tensors="pt").input_ids[:, :32] for t in TEXTS]

        def loop(m, batches=batches):
            for b in batches:
                m(b)

        info = {"versions": versions, "config": cfg_name, "architecture": arch}
        with torch.no_grad():
            model = mtq.quantize(model, getattr(mtq, cfg_name), loop)  # calibration runs on CPU
            try:
                model(IDS)
            except AssertionError as e:  # ModelOpt 0.47's NVFP4 fake quantization is CUDA only
                info["fake_quant_forward_on_cpu"] = f"AssertionError: {e}"
        export_hf_checkpoint(model, export_dir=out)
        tok.save_pretrained(out)
        tensors = {"ids": IDS, "weight_only_logits": reference_logits(src, out, False)}
        info["weight_only_logits"] = ("the source model in float32 with every exported NVFP4 weight replaced by "
                                      "ModelOpt's own NVFP4QTensor.dequantize (float32, non-fast path) of the exported "
                                      "tensors, activations unquantized (W4A16: the checkpoint's recipe)")
        if cfg_name == "NVFP4_DEFAULT_CFG":
            tensors["logits"] = reference_logits(src, out, True)
            info["logits"] = ("as weight_only_logits, each quantized layer's input through ModelOpt's "
                              "NVFP4QTensor.quantize -> dequantize with the stored input_scale")
        save_file(tensors, os.path.join(out, "runtime_logits.safetensors"))
        with open(os.path.join(out, "runtime.json"), "w") as f:
            json.dump(info, f, indent=1)
        print(name, info, sorted(os.listdir(out)))


if __name__ == "__main__":
    main()

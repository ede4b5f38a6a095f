"""Write the AMD Quark fixtures under tests/data/quark/ with Quark itself, and Quark's own runtime logits.

Written by amd-quark 0.13 with torch 2.13.0 (CPU) and transformers 5.16.1, in their own venv (not this project's):

    python3 -m venv /work/venvs/quark && /work/venvs/quark/bin/pip install torch==2.13.0 amd-quark==0.13 \
        "transformers>5,<5.17" accelerate
    OMP_NUM_THREADS=1 /work/venvs/quark/bin/python tests/data/make_quark_fixtures.py

For each recipe: a tiny Llama (hidden 64, 2 layers, 64-token vocabulary, seeded; float32, or bfloat16 for the
``*_bf16`` fixtures) built here and saved with save_pretrained, is quantized by Quark
(``LLMTemplate.get("llama").get_config(...)``, ``ModelQuantizer.quantize_model`` on seeded random calibration ids)
and exported with Quark's HF export (``export_safetensors``, ``quant_method: quark``, the format of AMD's Hub
checkpoints). The export is then loaded back by Quark's own importer (``quark.torch.export.api.
import_model_from_safetensors``, which builds its ``QParamsLinear`` layers, in the checkpoint's dtype) and run on
fixed ids: ``quark_logits.safetensors`` holds those ids and Quark's logits (as float32); ``quark_layers.json`` what
Quark's runtime holds per linear layer (weight and input quantizer specs, or none), as it loaded the export.

``qwen3_moe_mxfp4``: a tiny Qwen3-MoE (4 experts), whose fused experts Quark's own
``preprocess_for_quantization`` splits into per-expert Linear first (as Quark's ``get_model`` does); Quark's
importer reloads it the same way. ``VERSIONS.json`` records, per fixture, the tool versions, the recipe, and
whether transformers' own Quark integration (``from_pretrained``) reproduces Quark's logits (it does not for NVFP4,
the mixed recipe and the MoE: see docs).

``mxfp4_act_floor`` / ``mxfp4_act_ceil``: MXFP4 with dynamic MXFP4 inputs under ``scale_calculation_mode`` floor /
ceil (float32 ``torch.log2`` of the block maximum); ``mx_input_vectors.pt``: Quark's own runtime input quantizer
of ``mxfp4`` (even), ``mxfp4_act_floor`` and ``mxfp4_act_ceil`` applied to crafted blocks whose maxima are powers of
two or 1-3 float32 ulps from one (:func:`edge_blocks`).

Usage: ``make_quark_fixtures.py [NAME ...]`` (default: all; ``mx_input_vectors`` names the vectors, which read
the three fixtures above from disk).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from typing import Any

import torch

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quark")
VOCAB = 64
IDS_SEED = 1234


def tiny_llama(path: str, dtype: torch.dtype = torch.float32) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, initializer_range=0.1)
    LlamaForCausalLM(cfg).eval().to(dtype).save_pretrained(path)


def tiny_moe(path: str) -> None:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         num_experts=4, num_experts_per_tok=2, max_position_embeddings=64, tie_word_embeddings=True,
                         initializer_range=0.1, decoder_sparse_step=1, mlp_only_layers=[])
    Qwen3MoeForCausalLM(cfg).eval().save_pretrained(path)


def recipes() -> dict[str, dict[str, Any]]:
    from torch import nn

    return {
        "mxfp4": dict(scheme="mxfp4"),
        "mxfp4_weight_only": dict(scheme="mxfp4_weight_only"),
        "mxfp4_fp8": dict(scheme="mxfp4_fp8"),  # MXFP4 weights, static FP8 per-tensor inputs (input_scale)
        "mxfp6_e2m3": dict(scheme="mxfp6_e2m3"),
        "mxfp6_e3m2": dict(scheme="mxfp6_e3m2"),
        "nvfp4": dict(scheme="nvfp4"),
        # global MXFP4, every Linear MXFP6 E2M3 by type, name globs first-match in this order, one layer excluded
        "mixed": dict(scheme="mxfp4", layer_type_config={nn.Linear: "mxfp6_e2m3"},
                      # in sorted order: Quark matches globs in dict order when it quantizes, and its export
                      # writes them sorted, which its importer then matches in that order
                      layer_config={"*.k_proj": "mxfp4", "*.o_proj": "mxfp6_e3m2", "*.up_proj": "mxfp4_weight_only",
                                    "*.v_proj": "nvfp4", "*layers.1.mlp.*": "mxfp4_fp8"},
                      exclude_layers=["lm_head", "model.layers.0.mlp.down_proj"]),
    }


def quantize_export(base: str, out: str, model_type: str, recipe: dict[str, Any],
                    dtype: torch.dtype = torch.float32) -> None:
    from quark.torch import LLMTemplate, ModelQuantizer, export_safetensors
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).eval()
    if model_type != "llama":  # Quark's own MoE step (its get_model does it): fused experts -> per-expert Linear
        from quark.torch.utils.llm.model_preparation import preprocess_for_quantization

        preprocess_for_quantization(model)
    recipe = dict(recipe)
    input_mode = recipe.pop("input_scale_calculation_mode", None)
    config = LLMTemplate.get(model_type).get_config(**recipe)
    if input_mode is not None:  # dynamic MX inputs with another shared-exponent rule than Quark's default "even"
        config.global_quant_config.input_tensors.scale_calculation_mode = input_mode
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, VOCAB, (1, 32), generator=g) for _ in range(8)]
    model = ModelQuantizer(config).quantize_model(model, calib)
    export_safetensors(model, out)
    gen = os.path.join(out, "generation_config.json")
    if os.path.exists(gen):
        os.remove(gen)


def spec(q: Any) -> Any:
    """What one of Quark's runtime quantizers holds (a two-stage NVFP4 quantizer: its stages)."""
    if q is None:
        return None
    if isinstance(q, torch.nn.Sequential):
        return [spec(s) for s in q]
    s = q.qspec
    out = {k: str(getattr(getattr(s, k, None), "value", getattr(s, k, None)))
           for k in ("dtype", "qscheme", "is_dynamic", "group_size", "scale_calculation_mode", "scale_format")}
    return out


def runtime_outputs(out: str, base: str) -> dict[str, Any]:
    """Load the export with Quark's own importer and record its logits and per-layer quantizers; say whether
    transformers' Quark integration (``from_pretrained``) gives the same logits."""
    from quark.torch.export.api import import_model_from_safetensors
    from transformers import AutoModelForCausalLM

    model = import_model_from_safetensors(None, out, device="cpu", attn_implementation="sdpa").eval()
    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            layers[name] = {"class": type(m).__name__, "weight": spec(getattr(m, "weight_quantizer", None)),
                            "input": spec(getattr(m, "input_quantizer", None))}
    g = torch.Generator().manual_seed(IDS_SEED)
    ids = torch.randint(0, VOCAB, (2, 16), generator=g)
    with torch.no_grad():
        logits = model(ids).logits.float().contiguous()
    from safetensors.torch import save_file

    save_file({"input_ids": ids, "logits": logits}, os.path.join(out, "quark_logits.safetensors"))
    with open(os.path.join(out, "quark_layers.json"), "w") as f:
        json.dump(layers, f, indent=1, sort_keys=True)
    unquantized = AutoModelForCausalLM.from_pretrained(base, dtype="auto", attn_implementation="sdpa").eval()
    with torch.no_grad():
        base_logits = unquantized(ids).logits.float()
    out_info: dict[str, Any] = {
        "runtime": "quark.torch.export.api.import_model_from_safetensors(None, dir, device='cpu', "
                   "attn_implementation='sdpa'), in the checkpoint's dtype; logits stored as float32",
        "max_abs_diff_vs_unquantized": float((base_logits - logits).abs().max()),
        "top1_agreement_vs_unquantized": float((base_logits.argmax(-1) == logits.argmax(-1)).float().mean())}
    try:  # transformers' own Quark integration, for the record
        hf = AutoModelForCausalLM.from_pretrained(out, dtype="auto", attn_implementation="sdpa").eval()
        with torch.no_grad():
            hf_logits = hf(ids).logits.float()
        out_info["transformers_from_pretrained_equal"] = bool(torch.equal(hf_logits, logits))
        out_info["transformers_from_pretrained_max_abs_diff"] = float((hf_logits - logits).abs().max())
    except Exception as e:
        out_info["transformers_from_pretrained_error"] = f"{type(e).__name__}: {e}"[:300]
    return out_info


def edge_blocks() -> torch.Tensor:
    """Crafted float32 inputs [rows, 64] (two blocks of 32 a row): each block's maximum |x| exactly a power of two
    2**k, or 1-3 float32 ulps below or above it (for k from -20 to 20), the other elements seeded uniform in
    (-max, max); then a few seeded random rows and an all-zero block."""
    g = torch.Generator().manual_seed(7)
    maxima = []
    for k in (-20, -7, -3, -2, -1, 0, 1, 2, 3, 4, 5, 7, 8, 11, 16, 20):
        p = torch.tensor(2.0**k, dtype=torch.float32)
        for steps in (-3, -2, -1, 0, 1, 2, 3):
            bits = p.view(torch.int32) + steps  # ulps of the binade the value falls in
            maxima.append(bits.view(torch.float32))
    amax = torch.stack(maxima)
    blocks = (torch.rand(len(maxima), 32, generator=g) * 2 - 1) * amax[:, None] * 0.999
    pos = torch.randint(0, 32, (len(maxima),), generator=g)
    sign = torch.where(torch.rand(len(maxima), generator=g) < 0.5, -1.0, 1.0)
    blocks[torch.arange(len(maxima)), pos] = amax * sign
    rows = blocks.reshape(-1, 64)
    extra = torch.randn(6, 64, generator=g) * torch.logspace(-3, 3, 6)[:, None]
    extra[0, :32] = 0.0
    return torch.cat([rows, extra]).contiguous()


def mx_input_vectors(names: list[str]) -> None:
    """``mx_input_vectors.pt``: :func:`edge_blocks` and, per scale_calculation_mode, Quark's own runtime input
    quantizer (``model.layers.0.self_attn.q_proj.input_quantizer`` of the fixture its importer loaded) applied to
    them: the shared-exponent rule at the edges, where float32 ``torch.log2`` rounds."""
    from quark.torch.export.api import import_model_from_safetensors

    x = edge_blocks()
    out: dict[str, torch.Tensor] = {"x": x}
    for mode, name in (("even", "mxfp4"), *(((n.rsplit("_", 1)[1]), n) for n in names)):
        model = import_model_from_safetensors(None, os.path.join(HERE, name), device="cpu",
                                              attn_implementation="sdpa").eval()
        q = model.get_submodule("model.layers.0.self_attn.q_proj").input_quantizer
        assert spec(q)["scale_calculation_mode"] == mode, spec(q)
        with torch.no_grad():
            out[mode] = q(x.clone()).contiguous()
    torch.save(out, os.path.join(HERE, "mx_input_vectors.pt"))
    print("wrote mx_input_vectors.pt", {k: tuple(v.shape) for k, v in out.items()})


def main(names: list[str]) -> None:
    import quark
    import transformers

    versions = {"amd-quark": quark.__version__, "torch": torch.__version__, "transformers": transformers.__version__}
    print(versions)
    todo = recipes()
    todo["qwen3_moe_mxfp4"] = dict(scheme="mxfp4")
    # MXFP4 dynamic inputs under scale_calculation_mode floor / ceil (Quark's float32 torch.log2 of the block max)
    todo.update({f"mxfp4_act_{m}": dict(scheme="mxfp4", input_scale_calculation_mode=m) for m in ("floor", "ceil")})
    # bf16 models (Quark keeps a bf16 model's FP8 input_scale in bf16 and divides in bf16)
    todo.update({f"{n}_bf16": todo[n] for n in ("mxfp4", "mxfp4_fp8", "nvfp4")})
    with tempfile.TemporaryDirectory() as tmp:
        bases = {"llama": os.path.join(tmp, "llama"), "qwen3_moe": os.path.join(tmp, "qwen3_moe"),
                 "llama_bf16": os.path.join(tmp, "llama_bf16")}
        tiny_llama(bases["llama"])
        tiny_llama(bases["llama_bf16"], torch.bfloat16)
        tiny_moe(bases["qwen3_moe"])
        for name, recipe in todo.items():
            if names and name not in names:
                continue
            out = os.path.join(HERE, name)
            shutil.rmtree(out, ignore_errors=True)
            model_type = "qwen3_moe" if name.startswith("qwen3_moe") else "llama"
            base = bases["llama_bf16" if name.endswith("_bf16") else model_type]
            dtype = torch.bfloat16 if name.endswith("_bf16") else torch.float32
            quantize_export(base, out, model_type, recipe, dtype)
            checked = runtime_outputs(out, base)
            with open(os.path.join(out, "VERSIONS.json"), "w") as f:
                json.dump({**versions, "recipe": {k: str(v) for k, v in recipe.items()}, **checked}, f, indent=1)
            print("wrote", out)
    if not names or "mx_input_vectors" in names:
        mx_input_vectors(["mxfp4_act_floor", "mxfp4_act_ceil"])


if __name__ == "__main__":
    main(sys.argv[1:])

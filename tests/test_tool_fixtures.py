"""Checkpoints written by the tools themselves on CPU (tests/data/llmcompressor: llm-compressor 0.14 /
compressed-tensors 0.19; tests/data/modelopt: ModelOpt 0.47), each with the script that wrote it and the tool's own
logits: hf-mx's logits equal them bit for bit, or within the deviation measured and stated here."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from lm_eval_mx.hf.model import HFMXLM
from lm_eval_mx.numerics import runtimes as R
from lm_eval_mx.numerics.formats import FORMATS, NAMED_SCHEMES, ScaleMode
from lm_eval_mx.numerics.quantize import quantize_torch

DATA = os.path.join(os.path.dirname(__file__), "data")


def _logits(path: str, key: str, **kw) -> tuple[torch.Tensor, torch.Tensor, HFMXLM]:
    ref = load_file(f"{path}/runtime_logits.safetensors")
    lm = HFMXLM(pretrained=path, device="cpu", dtype="float32", **kw)
    with torch.no_grad():
        return lm.model(ref["ids"]).logits, ref[key], lm


@pytest.mark.parametrize(("name", "fmt"), [("nvfp4a16", "compressed-tensors nvfp4-pack-quantized"),
                                           ("mxfp8", "compressed-tensors mxfp8-quantized")])
def test_llm_compressor_exact(name, fmt, one_thread):
    got, want, lm = _logits(f"{DATA}/llmcompressor/{name}", "logits")
    assert torch.equal(got, want)
    assert lm.get_model_info()["mx_checkpoint"]["format"] == fmt
    if name == "mxfp8":  # held weights: compressed-tensors' own decompression (exact in bf16)
        from compressed_tensors.compressors.mxfp8.base import MXFP8QuantizationCompressor
        from compressed_tensors.quantization import QuantizationScheme

        path = f"{DATA}/llmcompressor/{name}"
        with open(f"{path}/config.json") as f:
            scheme = QuantizationScheme.model_validate(json.load(f)["quantization_config"]["config_groups"]["group_0"])
        stored = load_file(f"{path}/model.safetensors")
        for n, m in lm.model.named_modules():
            if hasattr(m, "mx_weight"):
                sd = {"weight": stored[f"{n}.weight"], "weight_scale": stored[f"{n}.weight_scale"]}
                want = MXFP8QuantizationCompressor.decompress(sd, scheme)["weight"]
                assert torch.equal(m.mx_weight("weight"), want.float()), n
        layer = lm.get_model_info()["mx_checkpoint"]["layers"]["model.layers.0.self_attn.q_proj"]
        assert layer["a_rule"] == "compressed-tensors-mx"
        assert lm.model.get_submodule("model.layers.0.self_attn.q_proj").weight.dtype == torch.uint8  # E4M3 bytes


@pytest.mark.parametrize("name", ["nvfp4", "qwen2_moe_nvfp4"])
def test_llm_compressor_static_nvfp4_exact(name, one_thread):
    """Static NVFP4 inputs as compressed-tensors computes them (e4m3_steps=divide with the stored input_global_scale
    as a multiplier): the tool's logits bit for bit."""
    got, want, lm = _logits(f"{DATA}/llmcompressor/{name}", "logits")
    assert torch.equal(got, want)
    layer = next(r for r in lm.get_model_info()["mx_checkpoint"]["layers"].values() if r["a"])
    assert (layer["a"]["e4m3_steps"], layer["a"]["tensor_scale"]) == ("divide", "static")


def test_compressed_tensors_mx_activation_rule():
    """The rule equals compressed-tensors' own dynamic MX quantization (vectors it computed); for MXFP8 none of this
    project's scale modes does (MXFP4: scale_mode=even)."""
    v = load_file(f"{DATA}/llmcompressor/act_vectors.safetensors")
    assert torch.equal(R.ct_mx(v["x"], FORMATS["fp4_e2m1"]), v["mxfp4"])
    assert torch.equal(quantize_torch(v["x"], dataclasses.replace(NAMED_SCHEMES["mxfp4"], scale_mode=ScaleMode.EVEN)),
                       v["mxfp4"])
    assert torch.equal(R.ct_mx(v["x"], FORMATS["fp8_e4m3"]), v["mxfp8"])
    for mode in ScaleMode:
        scheme = dataclasses.replace(NAMED_SCHEMES["mxfp8"], scale_mode=mode)
        assert not torch.equal(quantize_torch(v["x"], scheme), v["mxfp8"]), mode


@pytest.mark.parametrize(("name", "kw", "key"), [("nvfp4", {}, "logits"),
                                                 ("nvfp4", {"weight_only": True}, "weight_only_logits"),
                                                 ("w4a16_nvfp4", {}, "weight_only_logits")],
                         ids=["nvfp4", "nvfp4-weight_only", "w4a16_nvfp4"])
def test_modelopt_exports_exact(name, kw, key, one_thread):
    """ModelOpt's own dense exports, evaluated with ModelOpt's own NVFP4 arithmetic (weights: NVFP4QTensor.dequantize;
    NVFP4 inputs: NVFP4QTensor quantize -> dequantize with the stored input_scale; its fake-quant kernel is CUDA only:
    tests/data/modelopt/make_fixtures.py): bit for bit."""
    got, want, lm = _logits(f"{DATA}/modelopt/{name}", key, **kw)
    assert torch.equal(got, want)
    info = lm.get_model_info()["mx_checkpoint"]
    assert info["format"] == ("ModelOpt W4A16_NVFP4" if name == "w4a16_nvfp4" else "ModelOpt NVFP4")


def test_profile_compressed_tensors_on_its_static_nvfp4_checkpoint(one_thread):
    """profile=compressed-tensors beside its own static NVFP4 checkpoint keeps the recipe: the tool's logits bit for
    bit; vllm-blackwell (the FP4 kernel's steps) refuses it with the reason."""
    from lm_eval_mx.numerics.profiles import ProfileRefusal

    got, want, _ = _logits(f"{DATA}/llmcompressor/nvfp4", "logits", profile="compressed-tensors")
    assert torch.equal(got, want)
    with pytest.raises(ProfileRefusal, match="kernel's steps"):
        HFMXLM.check_before_loading(pretrained=f"{DATA}/llmcompressor/nvfp4", profile="vllm-blackwell")

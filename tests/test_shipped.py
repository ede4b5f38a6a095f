"""Checkpoints quantized by other tools, evaluated by hf-mx with their weights as stored: compressed-tensors NVFP4
and MXFP4 written by compressed-tensors' own compressor, ModelOpt NVFP4 written as ModelOpt's export writes it.
Held weights equal the library's decompression bit for bit; logits equal an explicit reference."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from conftest import save_tiny
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from lm_eval_mx.hf.model import HFMXLM
from lm_eval_mx.nn.layers import MXPackedLayer, mx_layers
from lm_eval_mx.numerics import layouts as L
from lm_eval_mx.numerics.formats import NAMED_SCHEMES, TensorScale
from lm_eval_mx.numerics.quantize import quantize_torch

pytest.importorskip("compressed_tensors")

NVFP4 = NAMED_SCHEMES["nvfp4"]
IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _calibrate(model) -> dict[str, float]:
    """The absolute maximum of each linear layer's input on a batch (the plain model)."""
    amax: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: amax.__setitem__(n, a[0].abs().amax().float()))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        model(torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1)))
    for h in hooks:
        h.remove()
    return amax


def _copy_tokenizer(src: str, out: str) -> None:
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{src}/{f}", f"{out}/{f}")


def write_ct(src: str, out: str, preset: str = "NVFP4", ignore=("lm_head",)) -> None:
    """A compressed-tensors checkpoint as llm-compressor saves one: the scheme applied, qparams as its observers set
    them (q/k/v and gate/up share the smallest weight global scale), compressed by ModelCompressor, config.json
    written by ``update_config``."""
    from compressed_tensors.compressors.model_compressors.model_compressor import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStatus,
        apply_quantization_config,
        preset_name_to_scheme,
    )

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    amax = _calibrate(model)
    qc = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme(preset, ["Linear"])}, ignore=list(ignore))
    apply_quantization_config(model, qc)
    mods = {n: m for n, m in model.named_modules() if hasattr(m, "quantization_scheme")}
    with torch.no_grad():
        if preset.startswith("NVFP4"):
            gs = {n: L.ct_nvfp4_global_scale(m.weight.data) for n, m in mods.items()}
            for n in list(gs):
                for grp in FUSED:
                    if n.endswith(grp[0]):
                        names = [n[: -len(grp[0])] + g for g in grp]
                        shared = torch.min(torch.cat([gs[x] for x in names])).reshape(1)
                        gs.update(dict.fromkeys(names, shared))
            for n, m in mods.items():
                m.weight_global_scale.copy_(gs[n])
                m.weight_scale.copy_(L.ct_nvfp4_block_scales(m.weight.data, gs[n]).to(m.weight_scale.dtype))
                if hasattr(m, "input_global_scale"):
                    m.input_global_scale.copy_((2688.0 / amax[n]).reshape(1))
        else:
            for m in mods.values():
                s = L.encode_ct_mxfp4(m.weight.data)["weight_scale"]
                m.weight_scale.copy_(s.to(m.weight_scale.dtype))
        for m in mods.values():
            m.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(out)
    _copy_tokenizer(src, out)


def ct_reference_weights(path: str, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """compressed-tensors' own decompression of every quantized layer: its ``decompress`` as it is (``dtype`` bf16,
    its default), or its ``unpack_fp4_from_uint8`` and ``dequantize`` evaluated in float32."""
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    cfg = json.loads(open(f"{path}/config.json").read())["quantization_config"]
    scheme = QuantizationScheme.model_validate(cfg["config_groups"]["group_0"])
    compressor = BaseCompressor.get_value_from_registry(cfg["format"])
    tensors = load_file(f"{path}/model.safetensors")
    out = {}
    for key in tensors:
        if key.endswith(".weight_packed"):
            name = key.removesuffix(".weight_packed")
            sd = {k.rpartition(".")[2]: v for k, v in tensors.items() if k.rpartition(".")[0] == name}
            if dtype == torch.float32 and cfg["format"] == "nvfp4-pack-quantized":
                p = sd["weight_packed"]
                x_q = unpack_fp4_from_uint8(p, p.shape[0], p.shape[1] * 2, dtype=torch.float32)
                out[name] = dequantize(x_q=x_q, scale=sd["weight_scale"].to(torch.float32), args=scheme.weights,
                                       global_scale=sd["weight_global_scale"], dtype=torch.float32)
            else:
                out[name] = compressor.decompress(sd, scheme)["weight"].to(dtype)
    return out


def reference_logits(src: str, ckpt: str, weights: dict[str, torch.Tensor], act) -> torch.Tensor:
    """The plain float32 model with the checkpoint's unquantized tensors as stored, ``weights`` (decoded, float32)
    in its quantized layers and their inputs quantized by ``act(name, x)``."""
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    mods = dict(model.named_modules())
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, t in load_file(f"{ckpt}/model.safetensors").items():
            if key in params and key.rpartition(".")[0] not in weights:
                params[key].copy_(t.float())
        for n, w in weights.items():
            mods[n].weight.copy_(w)
            if act is not None:
                mods[n].register_forward_pre_hook(lambda m, a, n=n: (act(n, a[0]),))
        return model(IDS).logits


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> str:
    return save_tiny(tmp_path_factory.mktemp("shipped_src"), "llama")


@pytest.fixture(scope="module")
def ct_nvfp4(src, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("ct_nvfp4"))
    write_ct(src, out, "NVFP4")
    return out


def _held(lm) -> dict[str, torch.Tensor]:
    from lm_eval_mx.numerics.packing import unpack_mx

    return {n: unpack_mx(m.mx_packed("weight")) for n, m in mx_layers(lm.model) if isinstance(m, MXPackedLayer)}


def _lm(path: str, **kw) -> HFMXLM:
    return HFMXLM(pretrained=path, device="cpu", dtype="float32", **kw)


def test_ct_nvfp4_weights_and_logits(ct_nvfp4, src):
    lm = _lm(ct_nvfp4)
    want = ct_reference_weights(ct_nvfp4)
    held = _held(lm)
    assert set(held) == set(want) and "lm_head" not in held
    lib_bf16 = ct_reference_weights(ct_nvfp4, torch.bfloat16)  # decompress() exactly as the library runs it
    for n, w in want.items():
        assert torch.equal(held[n], w), n  # bit for bit (zeros' signs aside: -0 == +0)
        assert torch.equal(held[n].to(torch.bfloat16), lib_bf16[n]), n
        assert lm.model.get_submodule(n).weight.dtype == torch.uint8  # kept packed
    stored = load_file(f"{ct_nvfp4}/model.safetensors")
    a = dataclasses.replace(NVFP4, tensor_scale=TensorScale.STATIC)

    def act(n, x):  # static NVFP4: ts = float32(1 / input_global_scale), block scales relative to it
        ts = (1.0 / stored[f"{n}.input_global_scale"].reshape(())).item()
        return quantize_torch(x, a, static_scale=ts)

    with torch.no_grad():
        got = lm.model(IDS).logits
    assert torch.equal(got, reference_logits(src, ct_nvfp4, want, act))
    info = lm.get_model_info()["mx_checkpoint"]
    assert info["format"] == "compressed-tensors nvfp4-pack-quantized"
    assert info["settings"]["activations_from"] == "checkpoint"
    layer = info["layers"]["model.layers.0.self_attn.q_proj"]
    assert layer["a"]["tensor_scale"] == "static" and layer["a_tensor_scale_from"].endswith("input_global_scale")
    assert json.dumps(lm.get_model_info(), default=str)


def test_ct_nvfp4_overrides(ct_nvfp4, src):
    want = ct_reference_weights(ct_nvfp4)
    lm = _lm(ct_nvfp4, weight_only=True)
    with torch.no_grad():
        assert torch.equal(lm.model(IDS).logits, reference_logits(src, ct_nvfp4, want, None))
    assert lm.get_model_info()["mx_checkpoint"]["settings"]["activations_from"] == "model_args (weight_only=True)"
    lm = _lm(ct_nvfp4, a_format="nvfp4")  # dynamic: each input's own amax
    with torch.no_grad():
        assert torch.equal(lm.model(IDS).logits, reference_logits(src, ct_nvfp4, want, lambda n, x: quantize_torch(x, NVFP4)))

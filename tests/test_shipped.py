"""Checkpoints quantized by other tools, evaluated by hf-mx with their weights as stored: compressed-tensors NVFP4
written by compressed-tensors' own compressor, MXFP4 written by llm-compressor itself (tests/data/llmcompressor),
ModelOpt NVFP4 written as ModelOpt's export writes it (ModelOpt's own exports: tests/test_tool_fixtures.py).
Held weights equal the library's decompression bit for bit; logits equal an explicit reference."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest
import torch
from conftest import save_tiny
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from lm_eval_mx.hf.model import HFMXLM
from lm_eval_mx.nn.layers import MXPackedLayer, mx_layers
from lm_eval_mx.numerics import layouts as L
from lm_eval_mx.numerics.formats import NAMED_SCHEMES, E4M3Steps, TensorScale
from lm_eval_mx.numerics.quantize import quantize_torch

pytest.importorskip("compressed_tensors")

NVFP4 = NAMED_SCHEMES["nvfp4"]
IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
FIXTURES = os.path.join(os.path.dirname(__file__), "data")
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


def _qc(path: str) -> dict:
    with open(f"{path}/config.json") as f:
        return json.load(f)["quantization_config"]


def _copy_tokenizer(src: str, out: str) -> None:
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{src}/{f}", f"{out}/{f}")


def write_ct(src: str, out: str, preset: str = "NVFP4", ignore=("lm_head",)) -> None:
    """A compressed-tensors NVFP4 checkpoint as llm-compressor saves one: the scheme applied, qparams as its observers set
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
    if not preset.startswith("NVFP4"):
        raise ValueError(f"write_ct writes NVFP4 presets; {preset}: see tests/data/llmcompressor (the tool's own)")
    gs = {n: L.ct_nvfp4_global_scale(m.weight.data) for n, m in mods.items()}
    for n in list(gs):
        for grp in FUSED:
            if n.endswith(grp[0]):
                names = [n[: -len(grp[0])] + g for g in grp]
                shared = torch.min(torch.cat([gs[x] for x in names])).reshape(1)
                gs.update(dict.fromkeys(names, shared))
    with torch.no_grad():
        for n, m in mods.items():
            m.weight_global_scale.copy_(gs[n])
            m.weight_scale.copy_(L.ct_nvfp4_block_scales(m.weight.data, gs[n]).to(m.weight_scale.dtype))
            if hasattr(m, "input_global_scale"):
                m.input_global_scale.copy_((2688.0 / amax[n]).reshape(1))
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

    cfg = _qc(path)
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
    a = dataclasses.replace(NVFP4, tensor_scale=TensorScale.STATIC, e4m3_steps=E4M3Steps.DIVIDE)

    def act(n, x):  # compressed-tensors' static NVFP4 steps, the stored input_global_scale a multiplier as stored
        return quantize_torch(x, a, static_scale=stored[f"{n}.input_global_scale"].reshape(()).item())

    with torch.no_grad():
        got = lm.model(IDS).logits
    assert torch.equal(got, reference_logits(src, ct_nvfp4, want, act))
    info = lm.get_model_info()["mx_checkpoint"]
    assert info["format"] == "compressed-tensors nvfp4-pack-quantized"
    assert info["settings"]["activations_from"] == "checkpoint"
    layer = info["layers"]["model.layers.0.self_attn.q_proj"]
    assert layer["a"]["tensor_scale"] == "static" and layer["a_tensor_scale_from"].endswith("input_global_scale")
    top = lm.get_model_info()  # the top-level record says the same as the layers: static activation scales
    assert top["mx_schemes"]["activations"]["tensor_scale"] == "static"
    assert top["mx_schemes"]["weights"]["elem"] == "fp4_e2m1" and "static" in top["mx_label"]
    assert json.dumps(top, default=str)


def test_ct_nvfp4_overrides(ct_nvfp4, src):
    want = ct_reference_weights(ct_nvfp4)
    lm = _lm(ct_nvfp4, weight_only=True)
    with torch.no_grad():
        assert torch.equal(lm.model(IDS).logits, reference_logits(src, ct_nvfp4, want, None))
    assert lm.get_model_info()["mx_checkpoint"]["settings"]["activations_from"] == "model_args (weight_only=True)"
    lm = _lm(ct_nvfp4, a_format="nvfp4")  # dynamic: each input's own amax
    with torch.no_grad():
        assert torch.equal(lm.model(IDS).logits, reference_logits(src, ct_nvfp4, want, lambda n, x: quantize_torch(x, NVFP4)))


def write_modelopt(src: str, out: str, weight_only: bool = False) -> dict[str, torch.Tensor]:
    """A ModelOpt NVFP4 export as ``export_hf_checkpoint`` writes one: per quantized Linear ``weight`` (uint8),
    ``weight_scale`` (E4M3), ``weight_scale_2`` and ``input_scale`` (float32 scalars, amax/2688); other tensors in bf16;
    hf_quant_config.json and config.json's quantization_config (``convert_hf_quant_config_format``)."""
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    amax = _calibrate(model)
    tensors = {}
    for key, t in model.state_dict().items():
        name, _, leaf = key.rpartition(".")
        if leaf == "weight" and name in amax and name != "lm_head":
            tensors.update({f"{name}.{k}": v for k, v in L.encode_modelopt_nvfp4(t.float()).items()})
            if not weight_only:
                tensors[f"{name}.input_scale"] = (amax[name] / 2688.0).reshape(())
        else:
            tensors[key] = t.contiguous()

    os.makedirs(out, exist_ok=True)
    model.config.save_pretrained(out)
    save_file(tensors, f"{out}/model.safetensors", metadata={"format": "pt"})
    algo = "W4A16_NVFP4" if weight_only else "NVFP4"
    hf_quant = {"producer": {"name": "modelopt", "version": "0.47.0"},
                "quantization": {"quant_algo": algo, "kv_cache_quant_algo": None, "group_size": 16,
                                 "exclude_modules": ["lm_head"]}}
    with open(f"{out}/hf_quant_config.json", "w") as f:
        json.dump(hf_quant, f, indent=4)
    group = {"weights": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}, "targets": ["Linear"]}
    if not weight_only:
        group["input_activations"] = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
    with open(f"{out}/config.json") as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"config_groups": {"group_0": group}, "ignore": ["lm_head"], "quant_algo": algo,
                                  "producer": hf_quant["producer"], "quant_method": "modelopt"}
    with open(f"{out}/config.json", "w") as f:
        json.dump(cfg, f, indent=4)
    _copy_tokenizer(src, out)
    return tensors


@pytest.mark.parametrize("weight_only", [False, True], ids=["NVFP4", "W4A16_NVFP4"])
def test_modelopt_nvfp4(src, tmp_path, weight_only):
    out = str(tmp_path / "modelopt")
    tensors = write_modelopt(src, out, weight_only)
    lm = _lm(out)
    held = _held(lm)
    want = {k.removesuffix(".weight_scale_2"): L.decode_modelopt_nvfp4(
        tensors[f"{k.removesuffix('_scale_2')}"], tensors[k.replace("_scale_2", "_scale")], tensors[k])
        for k in tensors if k.endswith(".weight_scale_2")}
    assert set(held) == set(want)
    for n, w in want.items():
        assert torch.equal(held[n], w), n
    a = dataclasses.replace(NVFP4, tensor_scale=TensorScale.STATIC)

    def act(n, x):  # static NVFP4 with ModelOpt's input_scale as the per-tensor scale
        return quantize_torch(x, a, static_scale=tensors[f"{n}.input_scale"].item())

    with torch.no_grad():
        assert torch.equal(lm.model(IDS).logits, reference_logits(src, out, want, None if weight_only else act))
    info = lm.get_model_info()["mx_checkpoint"]
    assert info["format"] == ("ModelOpt W4A16_NVFP4" if weight_only else "ModelOpt NVFP4")
    assert info["layers"]["model.layers.1.mlp.down_proj"]["a"] == (None if weight_only else a.to_dict())


def test_modelopt_from_hf_quant_config_alone(src, tmp_path):
    out = str(tmp_path / "mo")
    write_modelopt(src, out)
    with open(f"{out}/config.json") as f:
        cfg = json.load(f)
    del cfg["quantization_config"]  # older exports: hf_quant_config.json only
    with open(f"{out}/config.json", "w") as f:
        json.dump(cfg, f)
    assert _lm(out).get_model_info()["mx_checkpoint"]["format"] == "ModelOpt NVFP4"


def test_ct_mxfp4(one_thread):
    """llm-compressor's own MXFP4 checkpoint (tests/data/llmcompressor/mxfp4): held weights equal compressed-tensors'
    decompression, logits equal the tool's runtime bit for bit. (A checkpoint written here with compressed-tensors
    0.20.1's compressor from uint8 exponents was all zeros, every code byte 0x88: a test on it could not fail.)"""
    out = f"{FIXTURES}/llmcompressor/mxfp4"
    stored = load_file(f"{out}/model.safetensors")
    codes = torch.cat([t.reshape(-1) for k, t in stored.items() if k.endswith(".weight_packed")])
    assert (codes & 0x77).count_nonzero() > codes.numel() // 2  # most codes hold a non-zero value
    assert _qc(out)["format"] == "mxfp4-pack-quantized"
    lm = _lm(out)
    want = ct_reference_weights(out, torch.bfloat16)  # exact in bf16: value times a power of two
    held = _held(lm)
    assert set(held) == set(want)
    for n, w in want.items():
        assert torch.equal(held[n], w.float()), n
    ref = load_file(f"{out}/runtime_logits.safetensors")
    with torch.no_grad():
        assert torch.equal(lm.model(ref["ids"]).logits, ref["logits"])


def _rewrite(path: str, edit) -> None:
    t = load_file(f"{path}/model.safetensors")
    edit(t)
    save_file(t, f"{path}/model.safetensors", metadata={"format": "pt"})


def _copy(path: str, tmp_path) -> str:
    out = str(tmp_path / "copy")
    shutil.copytree(path, out)
    return out


def test_both_global_scale_conventions(ct_nvfp4, tmp_path):
    """A weight_global_scale whose reciprocal is exact keeps ts·s8 (kernels apply); one without keeps s8/gs as the
    library divides; both decode bit for bit as compressed-tensors does."""
    out = _copy(ct_nvfp4, tmp_path)
    q, d = "model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"
    s8 = load_file(f"{out}/model.safetensors")[f"{q}.weight_scale"].float().unique()
    inexact = None
    for v in torch.linspace(300.0, 3000.0, 2000):
        gs = v.reshape(1).float()
        try:
            L.ct_nvfp4_to_packed(torch.zeros(1, 8, dtype=torch.uint8), s8[:1].reshape(1, 1).to(torch.float8_e4m3fn), gs)
            L.ct_nvfp4_to_packed(torch.zeros(1, 8 * len(s8), dtype=torch.uint8),
                                 s8.reshape(1, -1).to(torch.float8_e4m3fn), gs)
        except ValueError:
            inexact = gs
            break
    assert inexact is not None

    def edit(t):
        t[f"{q}.weight_global_scale"] = torch.tensor([256.0])
        t[f"{d}.weight_global_scale"] = inexact
    _rewrite(out, edit)
    lm = _lm(out)
    layers = lm.get_model_info()["mx_checkpoint"]["layers"]
    assert layers[q]["weight_multiplier"] == "ts*s8" and layers[d]["weight_multiplier"] == "s8/gs"
    held, want = _held(lm), ct_reference_weights(out)
    for n in (q, d):
        assert torch.equal(held[n], want[n]), n


@pytest.mark.parametrize(("qc", "needle"), [
    ({"quant_method": "awq", "bits": 4}, "awq"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128}, "gptq"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "bitsandbytes"),
    ({"quant_method": "fbgemm_fp8"}, "fbgemm_fp8"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
      "config_groups": {"group_0": {"weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
                                    "targets": ["Linear"]}}}, "float-quantized"),
    ({"quant_method": "modelopt", "quant_algo": "FP8"}, "FP8"),
])
def test_unsupported_configs_name_what_is_supported(src, tmp_path, qc, needle):
    out = str(tmp_path / "q")
    shutil.copytree(src, out)
    with open(f"{out}/config.json") as f:
        cfg = json.load(f)
    cfg["quantization_config"] = qc
    with open(f"{out}/config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match="Supported quantized checkpoints") as e:
        _lm(out)
    assert needle in str(e.value) and "nvfp4-pack-quantized" in str(e.value) and "ModelOpt" in str(e.value)


@pytest.mark.parametrize(("edit", "needle"), [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight_scale"), "model.layers.1.mlp.up_proj.weight_scale"),
    (lambda t: t.pop("model.layers.0.self_attn.k_proj.input_global_scale"),
     "model.layers.0.self_attn.k_proj.input_global_scale"),
    (lambda t: t.__setitem__("model.layers.0.mlp.down_proj.weight_packed",
                             t["model.layers.0.mlp.down_proj.weight_packed"][:, :40].contiguous()),
     "model.layers.0.mlp.down_proj"),
    (lambda t: t.__setitem__("model.layers.0.mlp.down_proj.weight_scale",
                             t["model.layers.0.mlp.down_proj.weight_scale"].float()),
     "model.layers.0.mlp.down_proj"),
    (lambda t: t.__setitem__("model.layers.1.self_attn.q_proj.weight", torch.zeros(64, 64, dtype=torch.bfloat16)),
     "model.layers.1.self_attn.q_proj.weight"),
    (lambda t: t.__setitem__("lm_head.weight_scale", torch.ones(320, 4).to(torch.float8_e4m3fn)), "lm_head.weight_scale"),
    (lambda t: t.pop("model.norm.weight"), "model.norm.weight"),
], ids=["missing_scale", "missing_input_scale", "shape", "dtype", "dense_weight_of_quantized", "scale_of_ignored",
        "missing_plain"])
def test_tensors_that_disagree_with_the_config_are_named(ct_nvfp4, tmp_path, edit, needle):
    out = _copy(ct_nvfp4, tmp_path)
    _rewrite(out, edit)
    with pytest.raises(ValueError, match="nothing was evaluated") as e:
        _lm(out)
    assert needle in str(e.value)


@pytest.mark.parametrize(("extra", "needle"), [
    (dict(w_format="fp8"), "w_format"), (dict(format="nvfp4"), "format"), (dict(roles="mlp"), "roles"),
    (dict(rotation="hadamard"), "not rotated"), (dict(packed=True), "packed"),
])
def test_mx_keys_that_would_requantize_are_refused(ct_nvfp4, extra, needle, monkeypatch):
    import lm_eval_mx.hf.checkpoints as shipped

    monkeypatch.setattr(shipped, "load_shipped", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(ValueError, match=needle):
        _lm(ct_nvfp4, **extra)


def test_mxfp4_on_a_model_without_gpt_oss_experts_and_placement_refused(src, ct_nvfp4, tmp_path):
    out = str(tmp_path / "gptoss")
    shutil.copytree(src, out)
    with open(f"{out}/config.json") as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["lm_head"]}
    with open(f"{out}/config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match=r"gpt-oss MXFP4: no layer of this model is quantized"):
        _lm(out)
    with pytest.raises(ValueError, match="parallelize"):
        _lm(ct_nvfp4, parallelize=True)

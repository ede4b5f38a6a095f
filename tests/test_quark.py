"""AMD Quark checkpoints, evaluated by hf-mx as stored, against what amd-quark 0.13 itself wrote and computed:
the fixtures under tests/data/quark/ were exported by Quark (tests/data/make_quark_fixtures.py), each with Quark's own
runtime logits on fixed ids and the quantizers its runtime put on each layer. Quark is not installed here."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lm_eval_mx.hf.checkpoints import ShippedCheckpointError, recognise
from lm_eval_mx.hf.checkpoints.quark import FP8_PER_TENSOR
from lm_eval_mx.hf.model import HFMXLM
from lm_eval_mx.numerics import layouts as L
from lm_eval_mx.numerics.formats import NAMED_SCHEMES, ScaleMode
from lm_eval_mx.numerics.quantize import quantize_torch

DATA = Path(__file__).parent / "data" / "quark"
FIXTURES = ("mxfp4", "mxfp4_weight_only", "mxfp4_fp8", "mxfp6_e2m3", "mxfp6_e3m2", "nvfp4", "mixed", "qwen3_moe_mxfp4",
            "mxfp4_bf16", "mxfp4_fp8_bf16", "nvfp4_bf16", "mxfp4_act_floor", "mxfp4_act_ceil")
ELEM = {"fp4": "fp4_e2m1", "fp6_e2m3": "fp6_e2m3", "fp6_e3m2": "fp6_e3m2"}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> str:
    from lm_eval_mx.hf.testing import build_tokenizer

    path = str(tmp_path_factory.mktemp("tok"))
    build_tokenizer().save_pretrained(path)
    return path


def _lm(name: str, tokenizer: str, **kw) -> HFMXLM:
    """The checkpoint in its own dtype (float32, or bfloat16 for the ``*_bf16`` fixtures)."""
    return HFMXLM(pretrained=str(DATA / name), device="cpu", dtype="auto", tokenizer=tokenizer, **kw)


def _logits(lm: HFMXLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(ids).logits.float()


@pytest.mark.parametrize("name", FIXTURES)
def test_logits_equal_quarks_own(name, tokenizer, one_thread):
    ref = load_file(DATA / name / "quark_logits.safetensors")
    lm = _lm(name, tokenizer)
    assert torch.equal(_logits(lm, ref["input_ids"]), ref["logits"])


@pytest.mark.parametrize("mode,fixture", [("even", "mxfp4"), ("floor", "mxfp4_act_floor"), ("ceil", "mxfp4_act_ceil")])
def test_dynamic_mx_inputs_equal_quarks_quantizer_at_power_of_two_edges(mode, fixture):
    """Quark's own runtime input quantizer on crafted blocks whose maximum is a power of two or 1-3 float32 ulps
    from one (mx_input_vectors.pt): the scheme the reader gives the fixture's inputs reproduces it bit for bit.
    Quark's floor/ceil take float32 torch.log2 of the maximum, so this project's exact floor/ceil (exponent bits)
    miss it on some of these blocks: the vectors reach the edge."""
    v = torch.load(DATA / "mx_input_vectors.pt")
    (recipe,) = recognise(_qc(fixture)).recipes
    scheme = recipe.activation.scheme
    assert scheme.scale_mode.value == {"even": "even", "floor": "log2", "ceil": "log2_ceil"}[mode]
    assert torch.equal(quantize_torch(v["x"], scheme), v[mode])
    if mode != "even":
        exact = quantize_torch(v["x"], dataclasses.replace(scheme, scale_mode=ScaleMode(mode)))
        assert (exact != v[mode]).reshape(-1, 32).any(-1).sum().item() == {"floor": 24, "ceil": 17}[mode]


def test_each_layer_its_own_recipe_as_quarks_runtime(tokenizer, one_thread):
    """The mixed recipe: every layer's weight and input quantization as Quark's runtime set it (quark_layers.json)."""
    quark = json.loads((DATA / "mixed" / "quark_layers.json").read_text())
    lm = _lm("mixed", tokenizer)
    layers = lm._shipped_layers
    for name, q in quark.items():
        if q["weight"] is None:
            assert name not in layers
            continue
        w, a = layers[name]["w"], layers[name]["a"]
        qw = q["weight"] if isinstance(q["weight"], dict) else q["weight"][0]
        assert w["elem"] == ELEM[qw["dtype"]] and w["block_size"] == int(qw["group_size"]), name
        qa = q["input"]
        if qa is None:
            assert a is None, name
        elif isinstance(qa, list):  # NVFP4 inputs: dynamic blocks under the stored input_scale_2
            assert (a["name"], a["tensor_scale"], a["e4m3_steps"]) == ("fp4_e2m1/b16/e4m3+static/quark", "static",
                                                                   "quark"), name
            assert layers[name]["a_tensor_scale_from"] == f"{name}.input_scale_2"
        elif qa["dtype"] == "fp8_e4m3":
            assert a["scale_format"] == "none" and layers[name]["a_tensor_scale_from"] == f"{name}.input_scale", name
        else:
            assert (a["elem"], a["scale_mode"], a["tensor_scale"]) == (ELEM[qa["dtype"]], "even", "none"), name
    assert {r["recipe"] for r in layers.values()} >= {"layer_type_quant_config['Linear']", "layer_quant_config['*.k_proj']"}


def test_overrides_as_for_other_shipped_checkpoints(tokenizer, one_thread):
    ref = load_file(DATA / "mxfp4" / "quark_logits.safetensors")
    wo = _lm("mxfp4", tokenizer, weight_only=True)
    assert all(r["a"] is None for r in wo._shipped_layers.values())
    wonly = load_file(DATA / "mxfp4_weight_only" / "quark_logits.safetensors")
    # the same weights (same seed and scale rule) without input quantization: Quark's weight-only export's logits
    assert torch.equal(_logits(wo, ref["input_ids"]), wonly["logits"])
    a8 = _lm("mxfp4", tokenizer, a_format="mxfp8")
    assert {r["a"]["elem"] for r in a8._shipped_layers.values()} == {"fp8_e4m3"}


def test_fp6_packing_is_quarks():
    """Quark's Pack_fp6 diagram: codes v0..v3 -> byte0 = v1[1:0]·v0, byte1 = v2[3:0]·v1[5:2], byte2 = v3·v2[5:4]."""
    v = torch.tensor([[0b101010, 0b110011, 0b011100, 0b100001] * 8], dtype=torch.uint8)
    b = L.pack_fp6(v)
    assert b[0, :3].tolist() == [0b11_101010, 0b1100_1100, 0b100001_01]
    assert torch.equal(L.unpack_fp6(b), v)


@pytest.mark.parametrize("fmt", ["fp6_e2m3", "fp6_e3m2"])
def test_fp6_codec_round_trip(fmt):
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    t = L.encode_quark_mxfp6(w, fmt=fmt)
    scheme = L.QUARK_MXFP6_E2M3 if fmt == "fp6_e2m3" else L.QUARK_MXFP6_E3M2
    assert torch.equal(L.decode_quark_mxfp6(t["weight"], t["weight_scale"], fmt) + 0.0, quantize_torch(w, scheme))


def test_fp8_per_tensor_static_is_a_division_then_e4m3():
    """Quark's fake_quantize_fp8_per_tensor_with_scale: x / s, clamped to ±448, cast to float8_e4m3fn, times s."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, 40, generator=g) * 3
    s = 0.0123456
    want = (x / torch.tensor(s)).clamp(-448, 448).to(torch.float8_e4m3fn).float() * torch.tensor(s)
    assert torch.equal(quantize_torch(x, FP8_PER_TENSOR, static_scale=s), want)
    with pytest.raises(ValueError, match="needs tensor_scale=static and block_size=0"):
        type(FP8_PER_TENSOR)(NAMED_SCHEMES["mxfp8"].elem, 32, FP8_PER_TENSOR.scale_format)


def _qc(name: str) -> dict:
    return json.loads((DATA / name / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize("edit,needle", [
    (lambda q: q["export"].update(weight_format="fake_quantized"), "weight_format 'fake_quantized'"),
    (lambda q: q["global_quant_config"]["weight"].update(dtype="int4"), "weight spec"),
    (lambda q: q["global_quant_config"]["input_tensors"].update(dtype="int8"), "input_tensors spec"),
    (lambda q: q["global_quant_config"]["weight"].update(scale_calculation_mode="rceil"), "scale_calculation_mode"),
    (lambda q: q.update(kv_cache_quant_config={"*k_proj": {}}), "kv_cache_quant_config"),
    (lambda q: q["global_quant_config"].update(output_tensors={"dtype": "fp8_e4m3"}), "output_tensors"),
])
def test_unsupported_quark_configs_name_what_is_supported(edit, needle):
    qc = _qc("mxfp4")
    edit(qc)
    with pytest.raises(ShippedCheckpointError, match=needle) as e:
        recognise(qc)
    assert "AMD Quark real_quantized exports" in str(e.value) and "\n" not in str(e.value)


def test_fp_quant_refused_with_the_reason():
    with pytest.raises(ShippedCheckpointError, match=r"fp_quant.*Hadamard") as e:
        recognise({"quant_method": "fp_quant", "forward_dtype": "mxfp4"})
    assert "AMD Quark" in str(e.value)


def test_a_tensor_the_config_does_not_explain_is_named(tokenizer, tmp_path):
    """Quark matches globs in the stored config's order: a stored input_scale its runtime would ignore is refused."""
    d = tmp_path / "ck"
    shutil.copytree(DATA / "mxfp4_fp8", d)
    qc = json.loads((d / "config.json").read_text())
    qc["quantization_config"]["global_quant_config"]["input_tensors"] = None
    (d / "config.json").write_text(json.dumps(qc))
    with pytest.raises(ShippedCheckpointError, match="input_scale"):
        HFMXLM(pretrained=str(d), device="cpu", dtype="float32", tokenizer=tokenizer)



def test_per_tensor_scale_format_is_not_a_model_args_value(tokenizer):
    """scale_format=none is what a stored FP8 input_scale runs with; as a key it names the checkpoint's scale."""
    with pytest.raises(ValueError, match="scale_format=none"):
        _lm("mxfp4_fp8", tokenizer, a_format="fp8_e4m3", scale_format="none")

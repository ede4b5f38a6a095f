"""auto-round's own format (``quant_method: auto-round``, ``packing_format: auto_round:llm_compressor``), read as
auto-round's runtime computes it. Every reference here comes from auto-round 0.16.1 itself (tests/data/auto_round:
checkpoints it wrote, the logits its own inference backend computed on them, activation vectors from its own
quantizers); auto-round is not needed to run these tests."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from lm_eval_mx.hf.model import HFMXLM
from lm_eval_mx.numerics import runtimes as R
from lm_eval_mx.numerics.formats import FORMATS, NAMED_SCHEMES, ScaleMode
from lm_eval_mx.numerics.layouts import decode_ar_nvfp4
from lm_eval_mx.numerics.layouts._common import _unpack_codes
from lm_eval_mx.numerics.quantize import quantize_torch

DATA = os.path.join(os.path.dirname(__file__), "data", "auto_round")
# measured on tests/data/auto_round/nvfp4 (docs/_new/autoround.md): the packed weights multiply value · (ts · s8)
# where auto-round computes (value · (1/gs)) · s8: up to two float32 ulps on some ±1.5, 3, 6 codes
NVFP4_MAX_LOGIT_DIFF = 2e-6


def _lm(path: str, **kw) -> HFMXLM:
    return HFMXLM(pretrained=path, device="cpu", dtype="float32", **kw)


def _logits(lm: HFMXLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(ids).logits


@pytest.mark.parametrize("scheme", ["mxfp4", "mxfp8"])
def test_mx_logits_equal_auto_rounds_runtime(scheme, one_thread):
    ref = load_file(f"{DATA}/{scheme}/runtime_logits.safetensors")
    lm = _lm(f"{DATA}/{scheme}")
    assert torch.equal(_logits(lm, ref["ids"]), ref["logits"])  # bit for bit
    info = lm.get_model_info()["mx_checkpoint"]
    assert info["format"] == f"auto-round {scheme.upper()} (auto_round:llm_compressor)"
    layer = info["layers"]["model.layers.1.mlp.down_proj"]
    assert layer["a_rule"] == "auto-round-mx" and layer["a"]["elem"] == NAMED_SCHEMES[scheme].elem.name
    assert "lm_head" not in info["layers"]  # auto-round keeps it in high precision (outside block_name_to_quantize)
    assert lm.model.get_submodule("model.layers.0.self_attn.q_proj").weight.dtype == torch.uint8  # packed


def test_profile_auto_round_runs_its_mxfp4_export_as_its_runtime(one_thread):
    """profile=auto-round keeps its own export's recipe (auto-round's runtime: the same logits bit for bit); its
    MXFP8 export, in compressed-tensors' layout, is refused with the reason."""
    from lm_eval_mx.numerics.profiles import ProfileRefusal

    ref = load_file(f"{DATA}/mxfp4/runtime_logits.safetensors")
    assert torch.equal(_logits(_lm(f"{DATA}/mxfp4", profile="auto-round"), ref["ids"]), ref["logits"])
    with pytest.raises(ProfileRefusal, match="does not tell apart"):
        _lm(f"{DATA}/mxfp8", profile="auto-round")


@pytest.mark.parametrize("scheme", ["mxfp4", "mxfp8", "nvfp4"])
def test_bf16_logits_equal_auto_rounds_runtime(scheme, one_thread):
    """In bfloat16 (auto-round's runtime and hf-mx both dequantize in float32, cast, and run the model in bf16) every
    format is bit for bit, NVFP4 included: its float32 weight-order difference does not survive the cast here."""
    ref = load_file(f"{DATA}/{scheme}/runtime_logits.safetensors")
    lm = HFMXLM(pretrained=f"{DATA}/{scheme}", device="cpu", dtype="bfloat16")
    got = _logits(lm, ref["ids"])
    assert got.dtype == torch.bfloat16 and torch.equal(got, ref["logits_bf16"])


def test_nvfp4_logits_within_the_stated_deviation(one_thread):
    path = f"{DATA}/nvfp4"
    ref = load_file(f"{path}/runtime_logits.safetensors")
    lm = _lm(path)
    got = _logits(lm, ref["ids"])
    assert 0 < (got - ref["logits"]).abs().max() <= NVFP4_MAX_LOGIT_DIFF
    assert torch.equal(got.argmax(-1), ref["logits"].argmax(-1))
    layer = lm.get_model_info()["mx_checkpoint"]["layers"]["model.layers.0.self_attn.q_proj"]
    assert layer["a_rule"] == "auto-round-nvfp4" and layer["a_tensor_scale_from"].endswith("input_global_scale")


def test_nvfp4_deviation_is_the_weight_order_only(one_thread):
    """auto-round's weight decoding and hf-mx's activation rule in a plain model give auto-round's logits bit for bit:
    what differs is the packed weights' multiplication order, by at most two float32 ulps on ±1.5, 3, 6 codes."""
    path = f"{DATA}/nvfp4"
    ref = load_file(f"{path}/runtime_logits.safetensors")
    stored = load_file(f"{path}/model.safetensors")
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32).eval()
    modules, params = dict(model.named_modules()), dict(model.named_parameters())
    held = {n: m.mx_weight("weight") for n, m in _lm(path).model.named_modules() if hasattr(m, "mx_weight")}
    with torch.no_grad():
        for key, t in stored.items():
            if key in params:
                params[key].copy_(t.float())
        for name in held:
            w = decode_ar_nvfp4(*(stored[f"{name}.{t}"] for t in ("weight_packed", "weight_scale", "weight_global_scale")))
            diff = held[name] != w
            ulps = (held[name].view(torch.int32) - w.view(torch.int32)).abs()
            magnitude = _unpack_codes(stored[f"{name}.weight_packed"]) & 7
            assert ulps.max() <= 2 and set(magnitude[diff].tolist()) <= {3, 5, 7}, name  # 1.5, 3, 6 only
            modules[name].weight.copy_(w)
            gs = stored[f"{name}.input_global_scale"]
            modules[name].register_forward_pre_hook(lambda m, a, gs=gs: (R.autoround_nvfp4(a[0], gs),))
        assert torch.equal(model(ref["ids"]).logits, ref["logits"])


def test_activation_rules_equal_auto_rounds_quantizers():
    v = load_file(f"{DATA}/act_vectors.safetensors")
    x = v["x"]
    for bits, elem in ((4, "fp4_e2m1"), (8, "fp8_e4m3")):
        assert torch.equal(R.autoround_mx(x, FORMATS[elem]), v[f"mxfp{bits}"])
        # the rows whose block maxima sit just below a power of two: OCP's floor takes another scale there, the
        # scale mode of profile=auto-round (log2: the rule's exponent) auto-round's
        assert not torch.equal(quantize_torch(x, NAMED_SCHEMES[f"mxfp{bits}"])[10:14], v[f"mxfp{bits}"][10:14])
        log2 = dataclasses.replace(NAMED_SCHEMES[f"mxfp{bits}"], scale_mode=ScaleMode.LOG2)
        assert torch.equal(quantize_torch(x, log2), v[f"mxfp{bits}"])
    assert torch.equal(R.autoround_nvfp4(x[:10], v["nvfp4_gs"]), v["nvfp4"])
    assert R.autoround_nvfp4(x[:10].to(torch.bfloat16), v["nvfp4_gs"]).dtype == torch.bfloat16


def _with_qc(tmp_path, edit) -> str:
    out = str(tmp_path / "ckpt")
    shutil.copytree(f"{DATA}/mxfp4", out)
    with open(f"{out}/config.json") as f:
        cfg = json.load(f)
    edit(cfg["quantization_config"])
    with open(f"{out}/config.json", "w") as f:
        json.dump(cfg, f)
    return out


def test_int_w4a16_refused_with_the_reason(monkeypatch):
    import lm_eval_mx.hf.checkpoints as checkpoints

    monkeypatch.setattr(checkpoints, "load_shipped", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(ValueError, match="Supported quantized checkpoints") as e:
        _lm(f"{DATA}/w4a16")
    msg = str(e.value)
    assert "'int'" in msg and "auto_round:auto_gptq" in msg and "integer weights" in msg and "auto_round:llm_compressor" in msg


@pytest.mark.parametrize(("edit", "needle"), [
    (lambda qc: qc.update(act_data_type="mx_fp_rceil"), "mx_fp_rceil"),
    (lambda qc: qc.update(extra_config={"model.layers.0.mlp.down_proj": {"bits": 8}}), "extra_config"),
    (lambda qc: qc.pop("block_name_to_quantize"), "block_name_to_quantize"),
    (lambda qc: qc.update(group_size=64), "group_size 64"),
], ids=["rceil", "mixed", "no_blocks", "group"])
def test_unsupported_auto_round_configs_named(tmp_path, edit, needle):
    with pytest.raises(ValueError, match="Supported quantized checkpoints") as e:
        _lm(_with_qc(tmp_path, edit))
    assert needle in str(e.value)


def test_high_precision_override_and_weight_only(tmp_path, one_thread):
    out = _with_qc(tmp_path, lambda qc: qc.update(extra_config={"model.layers.0.mlp.down_proj": {"bits": 16}}))
    stored = load_file(f"{out}/model.safetensors")  # the layer is stored packed: left so, the loader names it
    assert "model.layers.0.mlp.down_proj.weight_packed" in stored
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj\.weight_packed"):
        _lm(out)
    lm = _lm(f"{DATA}/mxfp4", weight_only=True)
    layer = lm.get_model_info()["mx_checkpoint"]["layers"]["model.layers.0.mlp.down_proj"]
    assert layer["a"] is None and "a_rule" not in layer


def test_rule_names_checked():
    from lm_eval_mx.nn.spec import MXSpec

    with pytest.raises(ValueError, match="known: auto-round-mx"):
        MXSpec(NAMED_SCHEMES["mxfp4"], NAMED_SCHEMES["mxfp4"], a_rule="floor")
    with pytest.raises(ValueError, match="needs the activation scheme"):
        MXSpec(NAMED_SCHEMES["mxfp4"], None, a_rule="auto-round-mx")


def test_rule_and_stored_scale_inputs_share_the_sibling_cache():
    """Inputs quantized by a checkpoint's rule or with a stored scale go through the sibling cache like any other:
    siblings fed one tensor share one result; another rule, another stored scale or an in-place change recompute."""
    from lm_eval_mx.nn.spec import MXSpec
    from lm_eval_mx.numerics.quantize import make_scheme

    mx = NAMED_SCHEMES["mxfp4"]
    x = torch.randn(4, 64) * 3
    with torch.no_grad():
        q = MXSpec(mx, mx, a_rule="auto-round-mx").act(x)
        assert MXSpec(mx, mx, a_rule="auto-round-mx").act(x) is q
        assert torch.equal(q, R.get_rule("auto-round-mx")(x, mx, None))
        ct = MXSpec(mx, mx, a_rule="compressed-tensors-mx").act(x)
        assert ct is not q and torch.equal(ct, R.get_rule("compressed-tensors-mx")(x, mx, None))
        x.mul_(0.5)
        q2 = MXSpec(mx, mx, a_rule="auto-round-mx").act(x)
        assert q2 is not q and torch.equal(q2, R.get_rule("auto-round-mx")(x, mx, None))
        static = make_scheme("fp4_e2m1", 16, scale_format="e4m3", tensor_scale="static")
        got = [MXSpec(mx, static, a_scale=s).act(x) for s in (0.5, 0.5, 0.25)]
        assert got[1] is got[0] and got[2] is not got[0]
        for s, g in zip((0.5, 0.25), (got[0], got[2])):
            assert torch.equal(g, quantize_torch(x, static, -1, static_scale=s))

"""MoE checkpoints written by llm-compressor itself (tests/data/moe, tests/data/make_moe_fixtures.py): per-expert stored
tensors loaded into transformers' fused 3-D experts, packed as stored, with logits equal to the tool's own runtime
logits saved beside each checkpoint; routers and Qwen2's shared_expert_gate as stored, its shared expert quantized."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from lm_eval_mx.hf.checkpoints import load_shipped, read_quant_config, recognise
from lm_eval_mx.nn.layers import MXPackedExperts, MXPackedLayer

DATA = Path(__file__).parent / "data" / "moe"


def _load(name: str, **kw):
    path = str(DATA / name)
    shipped = recognise(read_quant_config(path, AutoConfig.from_pretrained(path)))
    return load_shipped(path, shipped, activations=kw.pop("activations", None), dtype=torch.float32, **kw)


def _logits(model, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    ref = load_file(str(DATA / name / "tool_logits.safetensors"))
    with torch.no_grad():
        return model(ref["ids"]).logits, ref["logits"]


@pytest.mark.parametrize("name", ["llmc_qwen2_moe_mxfp4", "llmc_mixtral_nvfp4", "llmc_qwen3_moe_nvfp4"])
def test_llm_compressor_moe_logits_equal_the_tools(name, one_thread):
    """MXFP4 (dynamic MX activations) and NVFP4 W4A4 (static per-expert input scales, on compressed-tensors' own
    steps) bit for bit."""
    model, _, record = _load(name)
    out, ref = _logits(model, name)
    assert torch.equal(out, ref)
    assert torch.equal(out.argmax(-1), ref.argmax(-1))
    experts = {n: m for n, m in model.named_modules() if isinstance(m, MXPackedExperts)}
    assert len(experts) == 2 and all(record[n]["kind"] == "experts" for n in experts)
    for m in experts.values():  # packed as stored: uint8 codes, no high-precision copy
        assert m.gate_up_proj.dtype == torch.uint8 and m.down_proj.dtype == torch.uint8


def test_per_expert_static_input_scales_are_each_experts(one_thread):
    """llm-compressor stores one input_global_scale per expert projection: down_proj's differ between experts, and
    each expert quantizes its inputs with its own (gs as stored: compressed-tensors' multiplier, e4m3_steps=divide)."""
    model, _, record = _load("llmc_mixtral_nvfp4")
    stored = load_file(str(DATA / "llmc_mixtral_nvfp4" / "model.safetensors"))
    m = model.get_submodule("model.layers.0.mlp.experts")
    want = [stored[f"model.layers.0.block_sparse_moe.experts.{e}.down_proj.input_global_scale"].item()
            for e in range(4)]
    assert m.mx_spec.a.e4m3_steps.value == "divide"
    assert list(m.mx_a_scales["down_proj"]) == want and len(set(want)) > 1
    assert record["model.layers.0.mlp.experts"]["a_tensor_scale"]["down_proj"] == want


def test_routers_and_shared_expert_gate_as_stored_shared_expert_quantized(one_thread):
    model, report, _ = _load("llmc_qwen2_moe_mxfp4")
    stored = load_file(str(DATA / "llmc_qwen2_moe_mxfp4" / "model.safetensors"))
    for leaf in ("gate", "shared_expert_gate"):
        got = model.get_submodule(f"model.layers.1.mlp.{leaf}").weight
        assert not isinstance(model.get_submodule(f"model.layers.1.mlp.{leaf}"), MXPackedLayer)
        assert torch.equal(got, stored[f"model.layers.1.mlp.{leaf}.weight"])
    assert isinstance(model.get_submodule("model.layers.1.mlp.shared_expert.up_proj"), MXPackedLayer)
    skipped = {n for n, _, _ in report.skipped}
    assert "model.layers.1.mlp.shared_expert_gate" in skipped and "lm_head" in skipped


def test_report_counts_weights_not_packed_bytes(one_thread):
    """The replaced layers' weights are counted as weights (issue: packed bytes were counted, half of them)."""
    _, report, _ = _load("llmc_qwen2_moe_mxfp4")
    cfg = json.loads((DATA / "llmc_qwen2_moe_mxfp4" / "config.json").read_text())
    h, i, e, s, layers = (cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["num_experts"],
                          cfg["shared_expert_intermediate_size"], cfg["num_hidden_layers"])
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    per_layer = h * h * 2 + h * kv * 2 + e * 3 * h * i + 3 * h * s
    assert sum(entry.params for entry in report.replaced) == layers * per_layer


def test_mixed_recipe_each_layer_its_own_group(one_thread):
    """Two config groups (attention NVFP4 W4A4, experts MXFP4A16): logits equal llm-compressor's bit for bit (its
    static NVFP4 inputs on compressed-tensors' own steps), each layer records its own group, weight and activation
    scheme."""
    from lm_eval_mx.hf.model import HFMXLM

    name = "llmc_qwen3_moe_mixed"
    lm = HFMXLM(pretrained=str(DATA / name), device="cpu", dtype="float32")
    out, ref = _logits(lm.model, name)
    assert torch.equal(out, ref)
    info = lm.get_model_info()
    layers = info["mx_checkpoint"]["layers"]
    attn, experts = layers["model.layers.0.self_attn.q_proj"], layers["model.layers.0.mlp.experts"]
    assert attn["recipe"] == "config_groups.group_0" and attn["w"]["block_size"] == 16
    assert attn["a"]["tensor_scale"] == "static" and isinstance(attn["a_tensor_scale"], float)
    assert experts["recipe"] == "config_groups.group_1" and experts["w"]["block_size"] == 32 and experts["a"] is None
    assert info["mx_checkpoint"]["activation_recipe"] == "per layer" and info["mx_label"].endswith("a=per layer")
    assert len(info["mx_checkpoint"]["recipes"]) == 2
    assert not lm.mx_config.weight_only  # the attention layers quantize their inputs


def test_mx_fill_one_expert_at_a_time_is_the_inverse_of_mx_packed(one_thread):
    """``mx_fill(name, packed, index=e)`` into a layer set up on meta (as the loader and quantizers fill experts)
    gives back the bytes ``mx_packed(name, e)`` read; a packed weight of another shape is refused, naming it."""
    import copy
    import dataclasses

    from torch import nn

    model, _, _ = _load("llmc_mixtral_nvfp4")
    m = model.get_submodule("model.layers.1.mlp.experts")
    fresh = copy.deepcopy(m)
    for key in ("down_proj", "down_proj_scales", "down_proj_tensor_scale"):
        setattr(fresh, key, nn.Parameter(torch.empty_like(getattr(m, key), device="meta"), requires_grad=False))
    for e in reversed(range(4)):
        fresh.mx_fill("down_proj", m.mx_packed("down_proj", e), index=e)
    for key in ("down_proj", "down_proj_scales", "down_proj_tensor_scale"):
        assert torch.equal(getattr(fresh, key), getattr(m, key)), key
    wrong = dataclasses.replace(m.mx_packed("down_proj", 0), shape=torch.Size((32, 64)))
    with pytest.raises(ValueError, match=r"down_proj\[0\]: shape differs"):
        fresh.mx_fill("down_proj", wrong, index=0)


def test_modelopt_moe_export_read_as_modelopt_decodes_it(one_thread):
    """ModelOpt 0.47's own Mixtral export (``block_sparse_moe.experts.N.w1/w2/w3``, w1 and w3 sharing one
    weight_scale_2, one input_scale per projection for all experts): weight-only logits equal ModelOpt's own NVFP4
    dequantization of the checkpoint bit for bit; with the stored static input scales, logits differ from ModelOpt's
    NVFP4QTensor activation round trip by at most 0.02 (measured 0.0113; the top-1 tokens agree): the two quantize
    activations with different scale arithmetic."""
    name = "modelopt_mixtral_nvfp4"
    ref = load_file(str(DATA / name / "tool_logits.safetensors"))
    model, _, record = _load(name, activations=(None, "model_args (weight_only=True)"))
    assert torch.equal(_logits(model, name)[0], ref["logits_weight_only"])
    model, _, record = _load(name)
    out = _logits(model, name)[0]
    assert (out - ref["logits"]).abs().max().item() <= 0.02 and torch.equal(out.argmax(-1), ref["logits"].argmax(-1))
    m = model.get_submodule("model.layers.0.mlp.experts")
    assert len(set(m.mx_a_scales["gate_up_proj"])) == 1 and m.down_proj_tensor_scale.shape == (4,)
    assert record["model.layers.0.mlp.experts"]["a_tensor_scale_from"].endswith("input_scale")


def test_experts_the_config_leaves_unquantized_are_fused_from_per_expert_weights(tmp_path, one_thread):
    """Experts in the ignore list, stored per expert in high precision: fused as transformers fuses them
    (gate rows, then up rows, per expert), the other layers still packed."""
    import shutil

    from safetensors.torch import save_file

    out = tmp_path / "dense_experts"
    shutil.copytree(DATA / "llmc_qwen2_moe_mxfp4", out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["ignore"].append("re:.*mlp.experts.*")
    (out / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(out / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    for key in [k for k in tensors if ".experts." in k]:
        module = key.rpartition(".")[0]
        packed = tensors.pop(key)
        if key.endswith("weight_packed"):
            tensors[f"{module}.weight"] = torch.randn(packed.shape[0], packed.shape[1] * 2, generator=g)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    model, _, record = load_shipped(str(out), recognise(read_quant_config(str(out), AutoConfig.from_pretrained(out))),
                                    activations=None, dtype=torch.float32)
    m = model.get_submodule("model.layers.1.mlp.experts")
    assert not isinstance(m, MXPackedLayer) and "model.layers.1.mlp.experts" not in record
    p = "model.layers.1.mlp.experts.2."
    assert torch.equal(m.gate_up_proj[2], torch.cat([tensors[p + "gate_proj.weight"], tensors[p + "up_proj.weight"]]))
    assert torch.equal(m.down_proj[2], tensors[p + "down_proj.weight"])
    assert isinstance(model.get_submodule("model.layers.1.mlp.shared_expert.up_proj"), MXPackedLayer)

"""Gaps found by planting bugs in today's readers and GPTQ (each test here failed with its planted bug, and passed
every other test): profile= beside a shipped checkpoint, ModelOpt's shared w1/w3 weight_scale_2, Quark's stated
activation scale rule, and GPTQ's expert intermediate for experts with biases and gpt-oss's gate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

DATA = Path(__file__).parent / "data"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(("w4a4", "w4a16", "key"), [("llmcompressor/nvfp4", "llmcompressor/nvfp4a16", "logits"),
                                                    ("modelopt/nvfp4", "modelopt/w4a16_nvfp4", "weight_only_logits")])
def test_profile_beside_a_shipped_checkpoint_runs_as_the_stack(w4a4, w4a16, key):
    """profile=vllm-hopper beside an NVFP4 W4A4 checkpoint (llm-compressor's, ModelOpt's): vLLM on Hopper drops the
    activation quantization, so the logits equal the tool's own runtime logits of its W4A16 export of the same
    weights (same codes), and the record names the profile (it was refused as re-quantizing the weights)."""
    from lm_eval_mx.hf.model import HFMXLM

    ref = load_file(str(DATA / w4a16 / "runtime_logits.safetensors"))
    lm = HFMXLM(pretrained=str(DATA / w4a4), profile="vllm-hopper", device="cpu", dtype="float32")
    with torch.no_grad():
        assert torch.equal(lm.model(ref["ids"]).logits, ref[key])
    settings = lm.get_model_info()["mx_checkpoint"]["settings"]
    assert settings["activations_from"].startswith("profile=vllm-hopper")


def test_torchao_profile_quantizes_the_lm_head():
    """torchao's quantize_ default filter (_is_linear) takes every nn.Linear, the LM head included, as the profile's
    definition says (a planted bug that dropped it passed test_profiles.py)."""
    from lm_eval_mx.selection.config import parse_mx_args

    for fmt in ("mxfp8", "mxfp4", "nvfp4"):
        config, _ = parse_mx_args({"profile": "torchao", "format": fmt})
        assert "lm_head" in config.roles, fmt
    assert "lm_head" not in parse_mx_args({"profile": "vllm-hopper", "format": "nvfp4"})[0].roles


def test_modelopt_w1_w3_with_different_weight_scale_2_are_refused(tmp_path):
    """ModelOpt stores one weight_scale_2 for w1 and w3 of an expert; fused into gate_up_proj they must agree, else
    one of them would be decoded with the other's scale: refused, naming the tensor."""
    from transformers import AutoConfig

    from lm_eval_mx.hf.checkpoints import ShippedCheckpointError, load_shipped, read_quant_config, recognise

    out = tmp_path / "ck"
    shutil.copytree(DATA / "moe" / "modelopt_mixtral_nvfp4", out)
    tensors = load_file(str(out / "model.safetensors"))
    key = "model.layers.0.block_sparse_moe.experts.1.w3.weight_scale_2"
    tensors[key] = tensors[key] * 2
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    shipped = recognise(read_quant_config(str(out), AutoConfig.from_pretrained(out)))
    with pytest.raises(ShippedCheckpointError, match=r"experts\.gate_up_proj\[1\]\.weight_scale_2"):
        load_shipped(str(out), shipped, activations=None, dtype=torch.float32)


@pytest.mark.parametrize("mode", ["floor", "ceil"])
def test_quark_activation_scale_rule_is_the_configs(tmp_path, mode):
    """The mxfp4 fixture states scale_calculation_mode 'even'; a config stating floor/ceil for its inputs must
    quantize them by that rule (a reader that always used 'even' passed every other test)."""
    from lm_eval_mx.hf.checkpoints import load_shipped, recognise

    out = tmp_path / "ck"
    shutil.copytree(DATA / "quark" / "mxfp4", out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["global_quant_config"]["input_tensors"]["scale_calculation_mode"] = mode
    (out / "config.json").write_text(json.dumps(cfg))
    shipped = recognise(cfg["quantization_config"])
    rule = {"floor": "log2", "ceil": "log2_ceil"}[mode]  # Quark's float32 torch.log2 rules (tests/test_quark.py)
    assert {r.activation.scheme.scale_mode.value for r in shipped.recipes} == {rule}
    model, _, record = load_shipped(str(out), shipped, activations=None, dtype=torch.float32)
    assert {r["a"]["scale_mode"] for r in record.values()} == {rule}
    ref = load_file(str(DATA / "quark" / "mxfp4" / "quark_logits.safetensors"))
    with torch.no_grad():
        assert not torch.equal(model(ref["input_ids"]).logits, ref["logits"])  # 'even' gives Quark's logits


def test_gptq_expert_intermediate_of_gptoss_experts():
    """down_proj's GPTQ inputs for gpt-oss experts (transposed weights, biases, gpt-oss's clamped interleaved gate),
    against gpt-oss's expert activation written out (transformers' GptOssExperts): a planted bug dropping the
    first projection's bias passed every GPTQ test (Mixtral/Qwen experts have none)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lm_eval_mx.algorithms.gptq_moe import expert_intermediate

    cfg = AutoConfig.from_pretrained(DATA / "gptoss_mxfp4")
    del cfg.quantization_config
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    experts = model.model.layers[0].mlp.experts
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    x = torch.randn(5, cfg.hidden_size, generator=g) * 2
    e = 2
    gate_up = x @ experts.gate_up_proj[e] + experts.gate_up_proj_bias[e]  # [tokens, 2I], stored [H, 2I]
    gate, up = gate_up[..., ::2].clamp(max=cfg.swiglu_limit), gate_up[..., 1::2].clamp(-cfg.swiglu_limit,
                                                                                      cfg.swiglu_limit)
    want = (up + 1) * gate * torch.sigmoid(gate * cfg.swiglu_alpha)
    with torch.no_grad():
        torch.testing.assert_close(expert_intermediate(experts, x, e), want.detach())  # float32 defaults


def test_compressed_tensors_export_refuses_activations_on_some_layers_only():
    """compressed-tensors' export writes one config group (input_activations for every target): a selection where
    some MXFP4 layers quantize their inputs and others do not must be refused, else the weight-only layers would be
    served with quantized inputs (a planted bug dropping this check passed test_export_ct.py)."""
    from lm_eval_mx.algorithms.export_ct import check_layers
    from lm_eval_mx.nn.spec import MXSpec
    from lm_eval_mx.numerics.layouts import CT_MXFP4

    check_layers({"a": MXSpec(CT_MXFP4, CT_MXFP4), "b": MXSpec(CT_MXFP4, CT_MXFP4)})
    check_layers({"a": MXSpec(CT_MXFP4, None), "b": MXSpec(CT_MXFP4, None)})
    with pytest.raises(ValueError, match="one recipe for all quantized layers"):
        check_layers({"a": MXSpec(CT_MXFP4, CT_MXFP4), "b": MXSpec(CT_MXFP4, None)})


def test_write_beside_puts_the_old_checkpoint_back_when_the_new_one_cannot_take_its_place(tmp_path, monkeypatch):
    """--overwrite: the old DIR is moved aside, then the new one renamed into place; if that rename fails the old
    DIR must come back, and nothing be left beside it (a planted bug that dropped the restore passed every test)."""
    from lm_eval_mx.commands.quantize import write_beside

    out = tmp_path / "D"
    out.mkdir()
    (out / "config.json").write_text("old")
    real = Path.rename

    def rename(self, target):
        if Path(target) == out and self.name.startswith(".D.") and ".old." not in self.name:
            raise OSError("rename refused")
        return real(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="rename refused"):
        write_beside(out, lambda d: (d / "config.json").write_text("new"))
    assert (out / "config.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["D"]


def test_overwrite_replaces_a_compressed_tensors_output_of_quantize(tmp_path):
    """quantize --save_format compressed-tensors --overwrite DIR, run twice: the second run replaces what the first
    wrote (it was refused as 'not a packed MX checkpoint'); a compressed-tensors directory without quantize's
    report (another tool's) is still refused."""
    from lm_eval_mx.commands.quantize import check_output

    out = tmp_path / "ct"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "compressed-tensors"}}))
    (out / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="replaces only"):
        check_output(str(out), True)
    (out / "mx_quantize.json").write_text("{}")
    assert check_output(str(out), True) == out


def test_compare_profile_with_a_shipped_checkpoint_plans_each_stack():
    """compare --profile vllm-hopper --profile ocp --checkpoint DIR (llm-compressor NVFP4): vLLM-on-Hopper runs it
    (weight only), microxcaling refuses it with its reason; before the fix every such compare stopped with
    'profile: they would re-quantize or reinterpret the stored weights'."""
    from lm_eval_mx.commands.compare_profiles import profile_checkpoints

    path = str(DATA / "llmcompressor" / "nvfp4")
    runs, extra, refused = profile_checkpoints(["vllm-hopper", "ocp"], [("ck", path)],
                                               {"pretrained": "base", "device": "cpu"})
    assert runs == [("ck", path), ("vllm-hopper: ck", path)] and extra == {"vllm-hopper: ck": {"profile": "vllm-hopper"}}
    assert len(refused) == 1 and "--profile ocp" in refused[0] and "reads no quantized checkpoint" in refused[0]


def test_export_global_scale_searches_the_neighbours_of_one_over_ts():
    """NVFP4 export: for ts = 0.008721751... fl(1/ts) does not give s8 / gs == ts · s8 for these block scales, its
    float32 neighbour does; the export must find it (a planted bug that tried 1/ts only passed every test)."""
    from lm_eval_mx.algorithms.export_ct import exact_global_scale

    s8 = torch.tensor([1.0, 1.125, 448.0, 0.25, 3.5], dtype=torch.float32)
    ts = torch.tensor(0.008721751160919666, dtype=torch.float32)
    gs = exact_global_scale(ts, s8)
    assert gs is not None and gs.item() != (1.0 / ts).item()
    assert torch.equal(s8 / gs, ts * s8)
    assert not torch.equal(s8 / (1.0 / ts), ts * s8)


def test_expert_min_tokens_without_experts_is_refused():
    """quantize --method gptq --expert_min_tokens N on a selection without fused experts ran and ignored it."""
    from conftest import tiny_model

    from lm_eval_mx.algorithms.gptq import GPTQOptions
    from lm_eval_mx.algorithms.quantize_model import quantize_model
    from lm_eval_mx.selection.config import parse_mx_args

    model = tiny_model("llama")
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="--expert_min_tokens would be ignored"):
        quantize_model(model, parse_mx_args({"format": "mxfp4"})[0], "gptq", ids, GPTQOptions(expert_min_tokens=4))

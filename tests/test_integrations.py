"""hf-mx with PEFT adapters and with accelerate-offloaded weights."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from conftest import tiny_model

from lm_eval_mx.nn.layers import mx_disabled, mx_layers
from lm_eval_mx.selection.apply import apply_mx
from lm_eval_mx.selection.config import MXConfig, parse_mx_args

IDS = torch.tensor([[3, 17, 42, 99, 5, 64, 7, 120, 33, 2, 11, 80]])


def _lora(model):
    peft = pytest.importorskip("peft", reason="peft not installed")
    cfg = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    return peft.get_peft_model(model, cfg)


def test_peft_adapters_are_skipped_and_base_layers_keep_their_roles():
    model = _lora(tiny_model("llama"))
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    with torch.no_grad():
        ref = model(IDS).logits
        with model.disable_adapter():
            ref_no_adapter = model(IDS).logits
    report = apply_mx(model, MXConfig(), keep_original=True)
    roles = {e.name: e.role for e in report.replaced}
    assert not any("lora_" in n for n in roles)
    base = "base_model.model.model.layers.0"
    assert roles[f"{base}.self_attn.q_proj.base_layer"] == "attn_qkv"
    assert roles[f"{base}.mlp.down_proj.base_layer"] == "mlp_down"
    assert roles[f"{base}.mlp.gate_proj"] == "mlp_up"
    assert report.summary()["layers_per_role"] == {"attn_out": 2, "attn_qkv": 6, "mlp_down": 2, "mlp_up": 4}
    assert any(r == "PEFT adapter layer (kept in high precision)" for _, _, r in report.skipped)
    assert all(torch.equal(p, lora[n]) for n, p in model.named_parameters() if "lora_" in n)
    with torch.no_grad():
        out = model(IDS).logits
        with model.disable_adapter():
            out_no_adapter = model(IDS).logits
        with mx_disabled(model):
            assert torch.equal(model(IDS).logits, ref)  # MX off: the PEFT model, bit for bit
    assert torch.isfinite(out).all() and not torch.equal(out, ref)  # MX changes the output...
    assert not torch.equal(out, out_no_adapter)  # ...and the adapter still adds to it
    assert not torch.equal(ref, ref_no_adapter)


def test_hf_mx_with_peft_adapter(tiny_dir, tmp_path):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM

    from lm_eval_mx.hf.model import HFMXLM

    adapter = tmp_path / "adapter"
    _lora(AutoModelForCausalLM.from_pretrained(tiny_dir)).save_pretrained(adapter)
    lm = HFMXLM(pretrained=tiny_dir, peft=str(adapter), device="cpu", mlp_only=True)
    assert lm.mx_report.summary()["layers_per_role"] == {"mlp_down": 2, "mlp_up": 4}
    assert not any("lora_" in n for n, _ in mx_layers(lm.model))
    # the adapter is loaded and MX applied to its base layers: lm-eval's hf with the same adapter, replaced directly
    pairs = [("We hold these truths to be", " self-evident"), ("Four score and seven", " years ago")]
    reqs = [Instance("loglikelihood", {}, pair, i, metadata=("t", i, 1)) for i, pair in enumerate(pairs)]
    got = lm.loglikelihood(reqs)
    hf = HFLM(pretrained=tiny_dir, peft=str(adapter), device="cpu")
    with_adapter = hf.loglikelihood(reqs)
    apply_mx(hf.model, MXConfig(roles=("mlp_up", "mlp_down", "experts")))
    assert got == hf.loglikelihood(reqs)
    assert got != with_adapter
    assert got != HFMXLM(pretrained=tiny_dir, device="cpu", mlp_only=True).loglikelihood(reqs)  # adapter matters


def test_offloaded_weights_are_quantized_at_forward():
    """accelerate CPU offload keeps weights on the meta device: MX must quantize them per forward, identically."""
    from accelerate import cpu_offload

    model = tiny_model("llama")
    offloaded = copy.deepcopy(model)
    cpu_offload(offloaded, execution_device=torch.device("cpu"))
    assert offloaded.model.layers[0].mlp.down_proj.weight.device.type == "meta"
    cfg = parse_mx_args({"format": "fp4_e2m1"})[0]
    apply_mx(model, cfg)
    report = apply_mx(offloaded, cfg)
    assert any("quantized at each forward" in n for n in report.notes)
    with torch.no_grad():
        assert torch.equal(offloaded(IDS).logits, model(IDS).logits)


def test_gguf_file_is_loaded_dequantized(monkeypatch):
    """transformers >= 5.24 with `kernels` keeps a GGUF's quantized weights packed (GgufLinear), which MX cannot
    read: hf-mx asks for dense weights (GgufConfig(dequantize=True)) and passes gguf_file through."""
    from lm_eval.models.huggingface import HFLM

    from lm_eval_mx.hf.model import HFMXLM, gguf_dequantize_config

    seen = {}
    monkeypatch.setattr(HFLM, "_create_model", lambda self, *a, **k: seen.update(k))
    lm = object.__new__(HFMXLM)
    lm._mx_packed, lm.mx_shipped = None, None  # what _prepare sets for an unquantized checkpoint
    HFMXLM._create_model(lm, pretrained="x", gguf_file="m.Q4_1.gguf")
    config = seen["quantization_config"]
    assert seen["gguf_file"] == "m.Q4_1.gguf"
    from transformers import GgufConfig  # transformers >= 5.24 (the declared floor is 5.17: it may lack dequantize)

    if "dequantize" in inspect.signature(GgufConfig.__init__).parameters:
        assert isinstance(config, GgufConfig) and config.dequantize is True
        assert gguf_dequantize_config().dequantize is True
    else:  # transformers that always dequantizes a GGUF: nothing to ask
        assert config is None and gguf_dequantize_config() is None
    seen.clear()
    HFMXLM._create_model(lm, pretrained="x")  # no GGUF: nothing added
    assert seen["quantization_config"] is None


@pytest.mark.parametrize("extra", [{"device_map": "cpu"}, {"parallelize": True}])
def test_fake_quantization_with_device_map_and_parallelize(tiny_dir, extra):
    """hf's placement options work with fake quantization and give the same numbers as a plain load."""
    from lm_eval.api.instance import Instance

    from lm_eval_mx.hf.model import HFMXLM

    reqs = [Instance("loglikelihood", {}, ("We hold these truths", " to be"), 0)]
    placed = HFMXLM(pretrained=tiny_dir, format="fp4", mlp_only=True, device="cpu", **extra)
    plain = HFMXLM(pretrained=tiny_dir, format="fp4", mlp_only=True, device="cpu")
    assert placed.mx_report.summary()["layers_per_role"] == {"mlp_down": 2, "mlp_up": 4}
    assert len(list(mx_layers(placed.model))) == 6
    assert placed.loglikelihood(reqs) == plain.loglikelihood(reqs)

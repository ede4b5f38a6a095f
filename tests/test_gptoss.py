"""gpt-oss MXFP4 (tests/data/gptoss_mxfp4, written by tests/data/make_gptoss_fixture.py): experts held as stored in
packed MX layers, weight-only logits equal transformers' own runtime (``Mxfp4Config(dequantize=True)``, float32),
saved beside the checkpoint and, where transformers can, recomputed live; ``a_format`` quantizes the experts' inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from lm_eval_mx.hf.checkpoints import load_shipped, read_quant_config, recognise
from lm_eval_mx.hf.model import HFMXLM
from lm_eval_mx.nn.layers import MXPackedExperts, MXPackedLayer
from lm_eval_mx.numerics.formats import NAMED_SCHEMES
from lm_eval_mx.numerics.layouts import decode_gptoss_mxfp4
from lm_eval_mx.numerics.quantize import quantize_torch

PATH = str(Path(__file__).parent / "data" / "gptoss_mxfp4")
REF = load_file(f"{PATH}/transformers_logits.safetensors")


def _shipped():
    return recognise(read_quant_config(PATH, AutoConfig.from_pretrained(PATH)))


def _logits(model) -> torch.Tensor:
    model.config._attn_implementation = "eager"  # as the saved logits were computed
    with torch.no_grad():
        return model(REF["ids"]).logits


def _transformers_model():
    from transformers import Mxfp4Config

    return AutoModelForCausalLM.from_pretrained(PATH, quantization_config=Mxfp4Config(dequantize=True),
                                                dtype=torch.float32, attn_implementation="eager").eval()


def test_weight_only_logits_equal_transformers_saved(one_thread):
    model, report, record = load_shipped(PATH, _shipped(), activations=None, dtype=torch.float32)
    assert torch.equal(_logits(model), REF["logits"])
    experts = [m for _, m in model.named_modules() if isinstance(m, MXPackedExperts)]
    assert len(experts) == 2 and all(m.gate_up_proj.dtype == torch.uint8 for m in experts)  # no bf16 copy
    assert not any(isinstance(m, MXPackedLayer) for n, m in model.named_modules() if "self_attn" in n)
    stored = load_file(f"{PATH}/model.safetensors")
    e = model.get_submodule("model.layers.1.mlp.experts")
    assert torch.equal(e.gate_up_proj.view(4, 128, -1), stored["model.layers.1.mlp.experts.gate_up_proj_blocks"]
                       .flatten(-2))  # the bytes as stored
    assert torch.equal(model.model.layers[1].self_attn.sinks, stored["model.layers.1.self_attn.sinks"].float())
    assert record["model.layers.0.mlp.experts"]["a"] is None and report.replaced[0].kind == "experts"


def test_weight_only_logits_equal_transformers_live(one_thread):
    """The same comparison against transformers' runtime now (its Mxfp4 dequantizing load works on CPU)."""
    ref = _transformers_model()
    model, _, _ = load_shipped(PATH, _shipped(), activations=None, dtype=torch.float32)
    assert torch.equal(_logits(model), _logits(ref))
    stored = load_file(f"{PATH}/model.safetensors")
    w = decode_gptoss_mxfp4(stored["model.layers.0.mlp.experts.down_proj_blocks"],
                            stored["model.layers.0.mlp.experts.down_proj_scales"])
    assert torch.equal(ref.model.layers[0].mlp.experts.down_proj, w.transpose(-1, -2))


def test_a_format_quantizes_the_experts_inputs(one_thread):
    """a_format=mxfp8: both expert projections' inputs MXFP8, as transformers' experts would compute with the
    inputs quantized (reference: transformers' model, its experts' input and gated output quantized)."""
    mxfp8 = NAMED_SCHEMES["mxfp8"]
    model, _, record = load_shipped(PATH, _shipped(), activations=(mxfp8, "model_args (a_format)"),
                                    dtype=torch.float32)
    ref = _transformers_model()
    for layer in ref.model.layers:
        ex = layer.mlp.experts
        ex.register_forward_pre_hook(lambda m, a: (quantize_torch(a[0], mxfp8), *a[1:]))
        gate = ex._apply_gate
        ex._apply_gate = lambda h, gate=gate: quantize_torch(gate(h), mxfp8)
    out, want = _logits(model), _logits(ref)
    assert torch.equal(out, want) and not torch.equal(out, REF["logits"])
    assert record["model.layers.0.mlp.experts"]["a_from"] == "model_args (a_format)"


def test_hf_mx_reads_gpt_oss_and_refuses_what_it_cannot(one_thread):
    lm = HFMXLM(pretrained=PATH, device="cpu", dtype="float32", attn_implementation="eager")
    info = lm.get_model_info()["mx_checkpoint"]
    assert info["format"] == "gpt-oss MXFP4" and info["settings"]["activations"] == "none (weight only)"
    with pytest.raises(ValueError, match="w_format"):
        HFMXLM(pretrained=PATH, device="cpu", w_format="nvfp4")
    placed = HFMXLM(pretrained=PATH, device="cpu", dtype="float32", device_map={"": "cpu"},
                    attn_implementation="eager")
    assert torch.equal(_logits(placed.model), REF["logits"])


@pytest.mark.parametrize("device_map", [{"model.layers.0": "cpu", "lm_head": "cpu", "": "cpu"}, "auto", "cpu"])
def test_device_map_is_honoured_tensor_by_tensor(device_map, one_thread, monkeypatch):
    """Every stored tensor is moved, as it is read, to the device of the longest ``device_map`` prefix naming its
    module (CPU-only maps here; benchmarks/gptoss_load.py measures a GPU load)."""
    from lm_eval_mx.hf.checkpoints import loader

    asked: list[tuple[str, str]] = []
    real = loader._device_of
    monkeypatch.setattr(loader, "_device_of", lambda placed, name: asked.append((name, real(placed, name))) or
                        real(placed, name))
    model, _, _ = load_shipped(PATH, _shipped(), activations=None, dtype=torch.float32, device_map=device_map)
    assert torch.equal(_logits(model), REF["logits"])
    stored = load_file(f"{PATH}/model.safetensors")
    named = {n for n, _ in asked}
    assert {k for k in stored if "experts" not in k} <= named  # every plain tensor placed by name
    assert "model.layers.0.mlp.experts" in named  # the packed experts by their module
    assert {d for _, d in asked} == {"cpu"}
    assert real({"": "cuda:1", "model.layers.0": "cuda:0", "model.layers.0.mlp": "cpu"},
                "model.layers.0.mlp.experts.gate_up_proj_bias") == "cpu"
    assert real({"": "cuda:1", "model.layers.1": "cuda:0"}, "model.layers.10.mlp") == "cuda:1"


def test_device_map_onto_disk_or_a_missing_device_is_refused(one_thread):
    from lm_eval_mx.hf.checkpoints import ShippedCheckpointError

    with pytest.raises(ShippedCheckpointError, match="not onto disk"):
        load_shipped(PATH, _shipped(), activations=None, dtype=torch.float32, device_map={"": "disk"})
    if not torch.cuda.is_available():
        with pytest.raises(ShippedCheckpointError, match="'cuda:0' is not usable here"):
            load_shipped(PATH, _shipped(), activations=None, dtype=torch.float32, device="cuda:0")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_loads_straight_onto_the_gpu():
    """device=cuda: every tensor on the GPU as read (nothing left on the host), experts packed there, logits as
    transformers' (float32 GEMMs on the GPU: to 1e-4)."""
    torch.cuda.reset_peak_memory_stats()
    model, _, _ = load_shipped(PATH, _shipped(), activations=None, dtype=torch.float32, device="cuda:0")
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    assert {b.device.type for b in model.buffers()} <= {"cuda"}
    assert model.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.uint8
    out = _logits(model).cpu()
    assert torch.allclose(out, REF["logits"], atol=1e-4, rtol=0)

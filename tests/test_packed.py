"""packed=True: weights packed while loading (transformers quantizer), exact vs fake quantization on CPU."""

from __future__ import annotations

import pytest
import torch
from conftest import save_tiny
from test_attention import FALCON_RUNS
from test_model import requests
from transformers import AutoModelForCausalLM

from lm_eval_mx.hf.model import HFMXLM
from lm_eval_mx.hf.quantizer import MXHfQuantizer, MXQuantizationConfig
from lm_eval_mx.nn.attention import AttentionError
from lm_eval_mx.nn.layers import MXPackedLayer, mx_disabled, mx_layers
from lm_eval_mx.numerics.packing import pack_mx
from lm_eval_mx.selection.apply import apply_mx
from lm_eval_mx.selection.config import MXConfig

CONFIGS = [
    dict(w_format="fp4_e2m1", a_format="fp8_e4m3"),
    dict(format="fp6_e2m3", roles="mlp"),
    dict(format="int4", block_size=16, rounding="nearest", scale_mode="even"),
    dict(format="int8", block_size=0, weight_only=True),
    dict(w_format="fp8_e5m2", a_format="fp6_e3m2", attn_only=True, attn_bmm=True),
    dict(format="nvfp4"),  # E4M3 scales + a float32 tensor scale per weight (per expert)
    dict(w_format="nvfp4", a_format="fp8_e4m3", rotation="hadamard", rotation_seed=1),  # stored rotated
]
# dense (Linear), GPT-2 Conv1D, fused experts (plain and transposed-free MoE), no-block OPT, fused qkv
ARCHS = ["llama", "gpt2", "mixtral", "qwen2_moe", "opt", "phi3", "falcon"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, str]:
    return {a: save_tiny(tmp_path_factory.mktemp(a), a) for a in ARCHS}


def _load(path: str, dtype: torch.dtype = torch.bfloat16, **kw: object) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw).eval()


# Pairwise, not the full 7 configurations x 7 architectures: every configuration on each layer kind (Linear: llama,
# GPT-2 Conv1D: gpt2, fused 3-D experts: mixtral); the other architectures two configurations each, in turn, so each
# configuration also meets one of them (falcon takes attn_bmm, its refusal, and nvfp4).
KIND_ARCHS = ("llama", "gpt2", "mixtral")
OTHER_ARCHS = ("falcon", "qwen2_moe", "opt", "phi3")
PACKED_CASES = [(a, c) for a in KIND_ARCHS for c in CONFIGS] + [
    (a, CONFIGS[(4 + 2 * k + d) % len(CONFIGS)]) for k, a in enumerate(OTHER_ARCHS) for d in (0, 1)]


@pytest.mark.parametrize(("arch", "cfg"), PACKED_CASES,
                         ids=[f"{a}-" + "-".join(f"{k}={v}" for k, v in c.items()) for a, c in PACKED_CASES])
def test_packed_load_is_bit_identical_to_fake_quant(dirs, arch, cfg):
    """Packed loading (quantized while the checkpoint loads) equals fake quantization bit for bit: the report,
    uint8 codes and scales, and the logits. Pairs cover every configuration and every layer kind (above)."""
    qc = MXQuantizationConfig(**cfg)
    if cfg.get("attn_bmm") and arch == "falcon" and not FALCON_RUNS:
        with pytest.raises(AttentionError, match="FalconForCausalLM does not dispatch attention"):
            _load(dirs[arch], quantization_config=qc)
        return
    packed = _load(dirs[arch], quantization_config=qc)
    ref = _load(dirs[arch])
    fake_cfg = MXConfig(**{**qc.mx, "packed": False})
    fake_report = apply_mx(ref, fake_cfg)
    report = packed.hf_quantizer.mx_report
    assert [(e.name, e.role, e.w_format, e.a_format, e.params) for e in report.replaced] == [
        (e.name, e.role, e.w_format, e.a_format, e.params) for e in fake_report.replaced
    ]
    layers = [m for _, m in mx_layers(packed)]
    assert layers and all(isinstance(m, MXPackedLayer) for m in layers)
    for m in layers:
        for name in m.mx_prequantized:
            assert getattr(m, name).dtype == torch.uint8
            assert getattr(m, f"{name}_scales").dtype == torch.uint8
    ids = torch.randint(0, 128, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(packed(ids).logits, ref(ids).logits)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mixtral"])
def test_loader_packs_exactly_the_checkpoint_weights(dirs, arch):
    """The stored codes/scales are pack_mx of the checkpoint tensor (transposed for Conv1D)."""
    packed = _load(dirs[arch], quantization_config=MXQuantizationConfig(format="fp4_e2m1"))
    dense = _load(dirs[arch])
    checked = 0
    for name, m in mx_layers(packed):
        for w in m.mx_prequantized:
            original = dense.get_submodule(name).get_parameter(w).detach()
            if m._axis(w) not in (-1, original.dim() - 1):
                original = original.transpose(m._axis(w), -1)
            p = pack_mx(original, "fp4_e2m1")
            assert torch.equal(getattr(m, w), p.codes) and torch.equal(getattr(m, f"{w}_scales"), p.scales)
            checked += 1
    assert checked > 0


def test_memory_footprint_and_report_show_the_saving(dirs):
    dense = _load(dirs["mixtral"])
    fp8 = _load(dirs["mixtral"], quantization_config=MXQuantizationConfig(format="fp8_e4m3"))
    fp4 = _load(dirs["mixtral"], quantization_config=MXQuantizationConfig(w_format="fp4_e2m1", roles="mlp"))
    for model, bits in ((fp8, 8), (fp4, 4)):
        s = model.hf_quantizer.mx_report.summary()
        assert s["packed_weight_bytes"] / s["dense_weight_bytes"] == (bits + 8 / 32) / 16
        saved = s["dense_weight_bytes"] - s["packed_weight_bytes"]
        assert dense.get_memory_footprint() - model.get_memory_footprint() == saved
    table = fp4.hf_quantizer.mx_report.table()
    assert "stored packed:" in table and "(0.266x)" in table
    nv = _load(dirs["mixtral"], quantization_config=MXQuantizationConfig(format="nvfp4"))
    s = nv.hf_quantizer.mx_report.summary()
    n_weights = s["dense_weight_bytes"] // 2  # bf16
    n_matrices = 2 * 4 + 2 * 2 * 4  # q/k/v/o per layer + gate_up/down per expert: one float32 tensor scale each
    assert s["packed_weight_bytes"] == n_weights * 4.5 / 8 + 4 * n_matrices and s["packed_ratio"] < 0.29
    assert dense.get_memory_footprint() - nv.get_memory_footprint() == s["dense_weight_bytes"] - s["packed_weight_bytes"]


def test_device_map_auto_plans_with_packed_sizes(dirs):
    qc = MXQuantizationConfig(format="fp4_e2m1")
    model = _load(dirs["llama"], quantization_config=qc, device_map="auto")
    assert isinstance(model.hf_quantizer, MXHfQuantizer)
    layer = model.get_submodule("model.layers.0.mlp.up_proj")
    size = model.hf_quantizer.param_element_size(model, "model.layers.0.mlp.up_proj.weight", torch.empty(96, 64))
    assert size == layer.weight.numel() / (96 * 64) == 0.5


def test_missing_weight_is_an_error(tmp_path, dirs):
    import shutil

    from safetensors.torch import load_file, save_file

    d = tmp_path / "partial"
    shutil.copytree(dirs["llama"], d)
    sd = load_file(d / "model.safetensors")
    del sd["model.layers.1.mlp.down_proj.weight"]
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.weight.*not in the checkpoint"):
        _load(str(d), quantization_config=MXQuantizationConfig(format="fp4_e2m1"))


def test_config_round_trip_and_errors():
    qc = MXQuantizationConfig(w_format="fp4", roles="mlp|attn_out")
    again = MXQuantizationConfig.from_dict(qc.to_dict())
    assert again.mx_config == qc.mx_config and again.mx_config.packed
    assert qc.mx_config.w_format == "fp4_e2m1" and qc.mx_config.roles == ("mlp_up", "mlp_down", "experts", "attn_out")
    with pytest.raises(ValueError, match=r"unknown keys.*'w_fromat'"):
        MXQuantizationConfig(w_fromat="fp4")
    with pytest.raises(ValueError, match=r"unknown MX element format .fp4_e2m2.; valid formats: fp4_e2m1"):
        MXQuantizationConfig(w_format="fp4_e2m2")
    with pytest.raises(ValueError, match="no layer is selected"):
        MXQuantizationConfig(roles="none")
    assert MXQuantizationConfig(packed_gemm="fused").mx_config.label() == "fp8_e4m3 packed:fused"
    with pytest.raises(ValueError, match="packed_gemm must be one of dequant, fused, got 'fast'"):
        MXQuantizationConfig(packed_gemm="fast")
    with pytest.raises(ValueError, match=r"packed_gemm .* needs packed=True"):
        MXConfig(packed_gemm="fused")
    ruled = MXQuantizationConfig(layer_formats=".*:fp4", format="int8")  # the keys given survive the round trip
    assert MXQuantizationConfig.from_dict(ruled.to_dict()).mx_config.given == {"layer_formats", "format", "packed"}


def test_packed_refuses_keys_that_layer_rules_leave_unused(dirs):
    """The unused-key check runs for packed loading too: format is decided by a rule for every layer."""
    from lm_eval_mx.selection.apply import SelectionError

    with pytest.raises(SelectionError, match="format would be ignored"):
        _load(dirs["llama"], quantization_config=MXQuantizationConfig(layer_formats=".*:fp4", format="int8"))


def test_packed_needs_loading_and_cannot_switch_off(dirs):
    model = _load(dirs["llama"])
    with pytest.raises(ValueError, match="while the checkpoint loads"):
        apply_mx(model, MXConfig(packed=True))
    packed = _load(dirs["llama"], quantization_config=MXQuantizationConfig())
    with pytest.raises(RuntimeError, match="dropped their original"), mx_disabled(packed):
        pass
    # saving and loading packed weights as stored: tests/test_checkpoints.py


def test_hf_mx_packed_equals_fake_quant(dirs):
    args = dict(pretrained=dirs["llama"], device="cpu", batch_size=2, dtype="bfloat16", w_format="fp4_e2m1",
                a_format="fp8_e4m3", mlp_only=True)
    packed = HFMXLM(**args, packed=True)
    fake = HFMXLM(**args)
    got = packed.loglikelihood(requests())
    assert got == fake.loglikelihood(requests())
    info = packed.get_model_info()
    assert info["mx_config"]["packed"] is True and "packed" in info["mx_label"]
    assert info["mx_report"]["packed_weight_bytes"] / info["mx_report"]["dense_weight_bytes"] == 4.25 / 16
    assert info["mx_report"]["layers_per_role"] == {"mlp_down": 2, "mlp_up": 4}
    assert packed.mx_cache_tag != fake.mx_cache_tag
    with pytest.raises(ValueError, match="for one configuration"):
        packed.set_mx(MXConfig())


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (dict(mx_keep_original=True), "mx_keep_original"),
        (dict(gguf_file="x.gguf"), "gguf_file"),
        (dict(peft="some/adapter"), "peft"),
        (dict(load_in_4bit=True), "load_in_4bit"),
        (dict(load_in_8bit=True), "packed=True cannot be combined with load_in_8bit: bitsandbytes"),
        (dict(delta="some/delta"), "packed=True cannot be combined with delta: delta weights"),
        (dict(quantization_config={"quant_method": "fp8"}), "packed=True cannot be combined with quantization_config"),
        (dict(roles="none"), "no layer is selected"),
        (dict(packed="maybe"), "packed"),
    ],
)
def test_hf_mx_packed_refuses_clashes_before_loading(extra, match, monkeypatch):
    def no_load(*a: object, **k: object) -> None:
        raise AssertionError("loaded a model")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_load)
    with pytest.raises(ValueError, match=match):
        HFMXLM(pretrained="/nonexistent", device="cpu", **{"packed": True, **extra})


def test_streamed_float8_checkpoint_loads_packed(tmp_path):
    """The big-model path: a checkpoint written tensor by tensor in float8, cast to bf16 and packed on load."""
    from conftest import tiny_config

    from lm_eval_mx.hf.testing import save_random_checkpoint

    d = save_random_checkpoint(tmp_path, tiny_config("mixtral"), std=0.2, dtype=torch.float8_e4m3fn, shard_bytes=40_000)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    qc = MXQuantizationConfig(w_format="fp4_e2m1", roles="experts")
    packed = _load(d, quantization_config=qc)
    ref = _load(d)
    assert ref.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    apply_mx(ref, MXConfig(**{**qc.mx, "packed": False}))
    assert packed.hf_quantizer.mx_report.summary()["layers_per_role"] == {"experts": 2}
    ids = torch.arange(30)[None] % 100
    with torch.no_grad():
        assert torch.equal(packed(ids).logits, ref(ids).logits)


def test_compare_refuses_packed_before_loading(monkeypatch):
    from lm_eval_mx.commands.compare import run_configs

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ValueError, match=r"packed=True loads a model per configuration.*--results"):
        run_configs({"pretrained": "/nonexistent"}, [("fp4", MXConfig(w_format="fp4", packed=True))], ["t"])


def test_tied_lm_head_is_refused_with_the_reason(dirs):
    """GPT-2 ties lm_head to the embeddings: packed=True cannot pack it (was: 'not in the checkpoint')."""
    with pytest.raises(ValueError, match="ties lm_head to the input embeddings"):
        _load(dirs["gpt2"], quantization_config=MXQuantizationConfig(format="fp4", roles="lm_head"))

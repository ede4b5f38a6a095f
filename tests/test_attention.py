"""MX attention matmuls (attn_bmm): exact against a hand-written reference, per architecture, in lm-eval."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model

from lm_eval_mx.attention import NAME, AttentionError, mx_attention_forward
from lm_eval_mx.config import MXConfig, parse_mx_args
from lm_eval_mx.layers import MXSpec, mx_disabled, remove_mx
from lm_eval_mx.numerics import quantize_mx
from lm_eval_mx.selection import apply_mx

IDS = torch.tensor([[3, 17, 42, 99, 5, 64, 7, 120, 33, 2, 11, 80, 9, 1, 4, 6, 8, 10, 12, 14]])
SUPPORTED = ["llama", "qwen2", "phi", "phi3", "mixtral", "gpt2"]


class _Module(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.config = type("Cfg", (), {})()


def _eager_mask(pad_from: int, t: int, b: int = 2) -> torch.Tensor:
    """Causal float mask, with keys >= pad_from of batch row 1 padded."""
    neg = torch.finfo(torch.float32).min
    causal = torch.triu(torch.full((t, t), neg), 1)
    mask = causal.expand(b, 1, t, t).clone()
    mask[1, :, :, pad_from:] = neg
    return mask


def test_function_matches_hand_reference_bit_for_bit():
    from lm_eval_mx import attention

    g = torch.Generator().manual_seed(0)
    b, h, hkv, t, d = 2, 4, 2, 40, 32
    q = torch.randn(b, h, t, d, generator=g)
    k = torch.randn(b, hkv, t, d, generator=g)
    v = torch.randn(b, hkv, t, d, generator=g) * 3
    mask = _eager_mask(30, t)
    mod = _Module()
    spec = MXSpec.make("fp4_e2m1", "fp4_e2m1")
    attention._STATES[id(mod.config)] = attention._State(spec, True, "sdpa")
    try:
        out, probs = mx_attention_forward(mod, q, k, v, mask, scaling=0.125)
        # hand-written reference: quantize Q, K along d; P along keys; V along the sequence
        kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        vv = vv.clone()
        vv[1, :, 30:] = 0  # keys nobody attends (padding) never set a scale
        s = quantize_mx(q, "fp4_e2m1") @ quantize_mx(kk, "fp4_e2m1").transpose(2, 3) * 0.125 + mask
        p = torch.softmax(s, -1)
        ref = (quantize_mx(p, "fp4_e2m1") @ quantize_mx(vv, "fp4_e2m1", axis=-2)).transpose(1, 2)
        assert torch.equal(out, ref)
        assert torch.equal(probs, p)
        # garbage in padded positions of V changes nothing
        v2 = v.clone()
        v2[1, :, 30:] = 1e4
        assert torch.equal(mx_attention_forward(mod, q, k, v2, mask, scaling=0.125)[0], out)
        # switched off: plain attention
        attention._STATES[id(mod.config)].enabled = False
        plain, _ = mx_attention_forward(mod, q, k, v, mask, scaling=0.125)
        assert torch.allclose(plain, (torch.softmax(q @ kk.transpose(2, 3) * 0.125 + mask, -1) @ v.repeat_interleave(2, 1)).transpose(1, 2), atol=1e-6)
    finally:
        attention._STATES.pop(id(mod.config))


@pytest.mark.parametrize("arch", SUPPORTED)
def test_supported_architectures(arch):
    base = tiny_model(arch)
    model = copy.deepcopy(base)
    with torch.no_grad():
        ref = base(IDS).logits
    report = apply_mx(model, parse_mx_args({"roles": "none", "attn_bmm": True})[0], keep_original=True)
    assert report.attn_bmm == "fp8_e4m3" and report.replaced == []
    assert model.config._attn_implementation == NAME
    calls = []
    from lm_eval_mx import attention

    orig = attention._STATES[id(model.config)].spec.quantizer
    attention._STATES[id(model.config)].spec.__dict__["quantizer"] = lambda *a: calls.append(a[2]) or orig(*a)
    with torch.no_grad():
        out = model(IDS).logits
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    n_layers = 2
    assert sorted(calls) == sorted([-1, -1, -1, -2] * n_layers)  # Q, K, P along reduction; V along sequence
    remove_mx(model)
    assert model.config._attn_implementation == base.config._attn_implementation
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, ref)


@pytest.mark.parametrize("arch", ["gpt_neo", "mpt"])
def test_unsupported_architectures_error(arch):
    with pytest.raises(AttentionError, match="does not dispatch attention through transformers' AttentionInterface"):
        apply_mx(tiny_model(arch), MXConfig(roles=(), attn_bmm=True))


def test_copy_without_state_is_an_error():
    model = tiny_model("llama")
    apply_mx(model, MXConfig(roles=(), attn_bmm=True))
    clone = copy.deepcopy(model)
    with pytest.raises(RuntimeError, match="no MX attention state"), torch.no_grad():
        clone(IDS)


def test_attn_bmm_false_leaves_attention_alone():
    model = tiny_model("llama")
    impl = model.config._attn_implementation
    apply_mx(model, MXConfig())
    assert model.config._attn_implementation == impl


def test_sliding_window_and_generation_with_cache():
    import transformers as tf
    from conftest import tiny_config

    cfg = tiny_config("mixtral")
    cfg.sliding_window = 8
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    apply_mx(model, MXConfig(attn_bmm=True, bmm_format="fp8_e5m2"))
    with torch.no_grad():
        out = model.generate(IDS[:, :6], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 11)


def test_mx_disabled_switches_bmm_off():
    model = tiny_model("llama")
    base = copy.deepcopy(model)
    apply_mx(model, MXConfig(roles=(), attn_bmm=True), keep_original=True)
    base.set_attn_implementation("eager")
    with torch.no_grad(), mx_disabled(model):
        off = model(IDS).logits
    assert torch.allclose(off, base(IDS).logits, atol=1e-5)


def test_config_and_label():
    cfg, _ = parse_mx_args({"format": "fp4", "attn_bmm": "True", "bmm_format": "fp8"})
    assert cfg.attn_bmm_format == "fp8_e4m3" and cfg.label() == "fp4_e2m1 bmm:fp8_e4m3"
    with pytest.raises(ValueError, match="needs attn_bmm=True"):
        parse_mx_args({"bmm_format": "fp8"})


def test_lm_eval_records_attn_bmm(tiny_dir):
    import lm_eval
    from lm_eval.tasks import TaskManager
    from test_cli_e2e import TASKS

    import lm_eval_mx._autoload as autoload

    autoload.register()
    res = lm_eval.simple_evaluate(
        model="hf-mx", model_args={"pretrained": tiny_dir, "device": "cpu", "mlp_only": True, "attn_bmm": True},
        tasks=["mx_corpus_ppl"], limit=2, task_manager=TaskManager(include_path=TASKS),
    )
    assert res["config"]["mx_config"]["attn_bmm"] is True
    assert res["config"]["mx_report"]["attn_bmm"] == "fp8_e4m3"


@pytest.mark.parametrize("arch", ["opt", "gpt_neox", "falcon", "bloom", "gptj", "qwen2_moe", "olmoe", "gemma"])
def test_other_architectures_run_mx_attention_or_refuse(arch, monkeypatch):
    """Never silent: either every attention layer runs the MX attention function, or a clear error."""
    from lm_eval_mx import attention

    model = tiny_model(arch)
    try:
        apply_mx(model, MXConfig(roles=(), attn_bmm=True))
    except AttentionError as e:
        assert type(model).__name__ in str(e)
        return
    calls = []
    real = attention.mx_attention_forward
    monkeypatch.setattr(attention, "mx_attention_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    attention._register()  # re-register the wrapped function under the same name
    with torch.no_grad():
        out = model(IDS).logits
    assert len(calls) == model.config.num_hidden_layers and torch.isfinite(out).all()

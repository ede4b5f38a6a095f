"""MX attention matmuls (attn_bmm): exact against a hand-written reference, per architecture, in lm-eval."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import pytest
import torch
import transformers
from conftest import tiny_model
from packaging.version import Version

from lm_eval_mx.nn.attention import NAME, AttentionError, mx_attention_forward
from lm_eval_mx.nn.layers import mx_disabled, remove_mx
from lm_eval_mx.nn.spec import MXSpec
from lm_eval_mx.numerics.formats import NAMED_SCHEMES, Scheme
from lm_eval_mx.numerics.quantize import make_scheme, quantize
from lm_eval_mx.selection.apply import apply_mx
from lm_eval_mx.selection.config import MXConfig, parse_mx_args

IDS = torch.tensor([[3, 17, 42, 99, 5, 64, 7, 120, 33, 2, 11, 80, 9, 1, 4, 6, 8, 10, 12, 14]])
SUPPORTED = ["llama", "qwen2", "phi", "phi3", "mixtral", "gpt2"]


class _Module(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.config = type("Cfg", (), {})()


def mx_eager_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scaling: float,
                       fmt: str | Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention written out: Q and K quantized along the head dim, P along the keys, V along the
    sequence; ``allowed[..., i, j]``: query i may see key j. Returns (output [B, T, H, D], probabilities)."""
    scheme = make_scheme(fmt) if isinstance(fmt, str) else fmt
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    s = quantize(q, scheme, -1) @ quantize(k, scheme, -1).transpose(2, 3) * scaling + mask
    p = torch.softmax(s, -1)
    return (quantize(p, scheme, -1) @ quantize(v, scheme, -2)).transpose(1, 2), p


@contextlib.contextmanager
def recorded_attention() -> Iterator[list[dict]]:
    """Every call of the MX attention function while the block runs: its inputs and output."""
    from transformers import AttentionInterface

    from lm_eval_mx.nn import attention

    calls: list[dict] = []

    def record(module, query, key, value, attention_mask, scaling=None, **kwargs):
        out, probs = attention.mx_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        calls.append({"q": query, "k": key, "v": value, "mask": attention_mask, "scaling": scaling, "out": out})
        return out, probs

    AttentionInterface.register(NAME, record)
    try:
        yield calls
    finally:
        attention._register()


def _eager_mask(pad_from: int, t: int, b: int = 2) -> torch.Tensor:
    """Causal float mask, with keys >= pad_from of batch row 1 padded."""
    neg = torch.finfo(torch.float32).min
    causal = torch.triu(torch.full((t, t), neg), 1)
    mask = causal.expand(b, 1, t, t).clone()
    mask[1, :, :, pad_from:] = neg
    return mask


@pytest.mark.parametrize("scheme", [make_scheme("fp4_e2m1"), NAMED_SCHEMES["nvfp4"]], ids=lambda s: s.name)
def test_function_matches_hand_reference_bit_for_bit(scheme):
    """MX and NVFP4 (bmm_format=nvfp4: per-tensor scales of Q, K, P and V per call) against the written-out math."""
    from lm_eval_mx.nn import attention

    g = torch.Generator().manual_seed(0)
    b, h, hkv, t, d = 2, 4, 2, 40, 32
    q = torch.randn(b, h, t, d, generator=g)
    k = torch.randn(b, hkv, t, d, generator=g)
    v = torch.randn(b, hkv, t, d, generator=g) * 3
    mask = _eager_mask(30, t)
    mod = _Module()
    spec = MXSpec(scheme, scheme)
    attention._STATES[id(mod.config)] = attention._State(spec, True, "sdpa")
    try:
        out, probs = mx_attention_forward(mod, q, k, v, mask, scaling=0.125)
        vv = v.clone()
        vv[1, :, 30:] = 0  # keys nobody attends (padding) never set a scale
        ref, p = mx_eager_reference(q, k, vv, mask == 0, 0.125, scheme)
        assert torch.equal(out, ref)
        assert torch.equal(probs, p)
        kk = k.repeat_interleave(2, 1)
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
    from lm_eval_mx.nn import attention

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


# GPT-J dispatches attention through the interface from transformers 5.24 (5.17-5.23: a clear error).
GPTJ_RUNS = Version(transformers.__version__) >= Version("5.24")
FALCON_RUNS = Version(transformers.__version__) >= Version("5.25")  # Falcon dispatches through the interface since
REFUSED = {"gpt_neo": "GPTNeoForCausalLM", "mpt": "MptForCausalLM", "bloom": "BloomForCausalLM",
           **({} if FALCON_RUNS else {"falcon": "FalconForCausalLM"}), **({} if GPTJ_RUNS else {"gptj": "GPTJForCausalLM"})}


@pytest.mark.parametrize("arch", REFUSED)
def test_unsupported_architectures_error(arch):
    """docs/model_args.md's refused list (MX attention matmuls), pinned: each raises AttentionError naming the model, and stays as it was."""
    model = tiny_model(arch)
    impl = model.config._attn_implementation
    with pytest.raises(AttentionError, match=f"attn_bmm: {REFUSED[arch]} does not dispatch attention through"):
        apply_mx(model, MXConfig(roles=(), attn_bmm=True))
    assert model.config._attn_implementation == impl


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


@pytest.mark.parametrize("arch", ["opt", "gpt_neox", *(["gptj"] if GPTJ_RUNS else []), *(["falcon"] if FALCON_RUNS else []),
                                  "qwen2_moe", "olmoe", "gemma"])
def test_other_supported_architectures_run_mx_attention(arch):
    """docs/model_args.md's supported list beyond the seed architectures, pinned: every attention layer runs the MX
    function (an AttentionError here fails the test), each call exact against the hand reference."""
    model = tiny_model(arch)
    apply_mx(model, MXConfig(roles=(), attn_bmm=True))
    with recorded_attention() as calls, torch.no_grad():
        out = model(IDS).logits
    assert len(calls) == model.config.num_hidden_layers and torch.isfinite(out).all()
    t = IDS.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for c in calls:
        scaling = c["scaling"] if c["scaling"] is not None else c["q"].shape[-1] ** -0.5
        assert torch.equal(c["out"], mx_eager_reference(c["q"], c["k"], c["v"], causal, scaling, "fp8_e4m3")[0])


def _sliding_model(window: int) -> torch.nn.Module:
    import transformers as tf
    from conftest import tiny_config

    from lm_eval_mx.hf.testing import randomize_

    cfg = tiny_config("mixtral")
    cfg.sliding_window = window
    torch.manual_seed(0)
    return randomize_(tf.AutoModelForCausalLM.from_config(cfg), 0.2, 0).eval()


def test_sliding_window_mask_matches_hand_reference():
    """Mixtral with a window of 8 over 20 tokens: each layer's MX attention output equals the written-out
    reference with query i seeing keys i-7..i, bit for bit, and differs from plain causal attention."""
    window, t = 8, IDS.shape[1]
    model = _sliding_model(window)
    apply_mx(model, MXConfig(attn_bmm=True, bmm_format="fp8_e5m2"))
    with recorded_attention() as calls, torch.no_grad():
        model(IDS)
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    sliding = (j <= i) & (i - j < window)
    assert len(calls) == 2
    for c in calls:
        ref, _ = mx_eager_reference(c["q"], c["k"], c["v"], sliding, c["scaling"], "fp8_e5m2")
        assert torch.equal(c["out"], ref)
        causal, _ = mx_eager_reference(c["q"], c["k"], c["v"], j <= i, c["scaling"], "fp8_e5m2")
        assert not torch.equal(c["out"][:, window:], causal[:, window:])


def test_nvfp4_bmm_in_a_model_matches_hand_reference():
    """bmm_format=nvfp4 beside NVFP4 linears (format=nvfp4, attn_bmm=True): each layer's attention output equals
    the written-out NVFP4 attention of its recorded Q, K, V, bit for bit."""
    t = IDS.shape[1]
    model = tiny_model("llama")
    config = parse_mx_args({"format": "nvfp4", "attn_bmm": True, "bmm_format": "nvfp4"})[0]
    report = apply_mx(model, config)
    assert report.attn_bmm == "nvfp4" and config.label() == "nvfp4 bmm"
    with recorded_attention() as calls, torch.no_grad():
        model(IDS)
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    assert len(calls) == 2
    for c in calls:
        ref, _ = mx_eager_reference(c["q"], c["k"], c["v"], j <= i, c["scaling"], NAMED_SCHEMES["nvfp4"])
        assert torch.equal(c["out"], ref)
        mx, _ = mx_eager_reference(c["q"], c["k"], c["v"], j <= i, c["scaling"], "fp4_e2m1")
        assert not torch.equal(c["out"], mx)


@pytest.mark.parametrize("window", [None, 4])
def test_generation_with_kv_cache(window):
    """KV-cache decoding through mx_eager, checked with values.

    A cached step cannot be compared bit for bit with a full forward in MX: V is quantized along the
    sequence, so in a full forward a position's output depends (through block scales) on later tokens,
    and even the last position, which sees the same keys either way, is computed by float32 GEMMs of 1 row
    instead of T rows, whose last-bit differences an MX rounding can turn into a flipped element (seen:
    0.97 in a logit). So, exactly: (1) in MX, each decoding step's attention call equals the hand reference
    on the keys and values it was given, with the causal (and sliding-window) mask written out from the
    absolute positions, and those keys and values are the ones the earlier steps cached plus the new token's;
    (2) with the MX matmuls switched off inside mx_eager, cached and uncached greedy generation agree token
    for token and the cached step's logits equal the full forward's last position to float32 accuracy.
    """
    from lm_eval_mx.nn.attention import bmm_enabled

    model = _sliding_model(window) if window else tiny_model("llama")
    apply_mx(model, MXConfig(roles=(), attn_bmm=True))
    prompt, new = IDS[:, :10], 6
    with recorded_attention() as calls, torch.no_grad():
        model.generate(prompt, max_new_tokens=new, do_sample=False, pad_token_id=0)
    layers = model.config.num_hidden_layers
    assert len(calls) == layers * new
    for step in range(new):
        for layer in range(layers):
            c = calls[step * layers + layer]
            end = prompt.shape[1] - 1 + step  # absolute position of the last token this call feeds
            m, n = c["q"].shape[-2], c["k"].shape[-2]
            assert m == (prompt.shape[1] if step == 0 else 1)
            assert n == (end + 1 if window is None else min(end + 1, max(m, window)))  # a window trims the cache
            if step:
                before = calls[(step - 1) * layers + layer]
                for name in ("k", "v"):  # the cached keys/values are exactly the earlier steps' ones
                    assert torch.equal(c[name][..., :-1, :], before[name][..., -(n - 1):, :])
            q_pos, k_pos = torch.arange(end - m + 1, end + 1)[:, None], torch.arange(end - n + 1, end + 1)[None, :]
            allowed = (k_pos <= q_pos) & ((q_pos - k_pos < window) if window else True)
            ref, _ = mx_eager_reference(c["q"], c["k"], c["v"], allowed, c["scaling"], "fp8_e4m3")
            assert torch.equal(c["out"], ref)
    with torch.no_grad(), bmm_enabled(model, False):
        cached = model.generate(prompt, max_new_tokens=new, do_sample=False, pad_token_id=0)
        uncached = model.generate(prompt, max_new_tokens=new, do_sample=False, pad_token_id=0, use_cache=False)
        full = model(IDS).logits[0, -1]
        step = model(IDS[:, -1:], past_key_values=model(IDS[:, :-1], use_cache=True).past_key_values).logits[0, -1]
    assert torch.equal(cached, uncached)
    assert torch.allclose(step, full, atol=1e-5) and not torch.equal(full, torch.zeros_like(full))

"""Role classification, replacement, exactness against a hand-written reference, reporting."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import ARCHS, MORE_ARCHS, tiny_model

from lm_eval_mx.nn.layers import MXLayer, mx_disabled, mx_layers
from lm_eval_mx.numerics.quantize import quantize, quantize_mx
from lm_eval_mx.numerics.rotation import rotate
from lm_eval_mx.selection.apply import SelectionError, apply_mx
from lm_eval_mx.selection.config import MXConfig, parse_mx_args
from lm_eval_mx.selection.roles import find_candidates

# Exact expected count of linear-like layers per role (2 transformer blocks each).
EXPECTED = {
    "gpt_neo": {"attn_qkv": 6, "attn_out": 2, "mlp_up": 2, "mlp_down": 2, "lm_head": 1},
    "qwen2": {"attn_qkv": 6, "attn_out": 2, "mlp_up": 4, "mlp_down": 2, "lm_head": 1},
    "phi": {"attn_qkv": 6, "attn_out": 2, "mlp_up": 2, "mlp_down": 2, "lm_head": 1},
    "llama": {"attn_qkv": 6, "attn_out": 2, "mlp_up": 4, "mlp_down": 2, "lm_head": 1},
    "phi3": {"attn_qkv": 2, "attn_out": 2, "mlp_up": 2, "mlp_down": 2, "lm_head": 1},
    "mixtral": {"attn_qkv": 6, "attn_out": 2, "experts": 2, "lm_head": 1},
    "mpt": {"attn_qkv": 2, "attn_out": 2, "mlp_up": 2, "mlp_down": 2, "lm_head": 1},
    "gpt2": {"attn_qkv": 2, "attn_out": 2, "mlp_up": 2, "mlp_down": 2, "lm_head": 1},
    # architectures no issue names
    "opt": {"attn_qkv": 6, "attn_out": 2, "mlp_up": 2, "mlp_down": 2, "lm_head": 1},
    "gpt_neox": {"attn_qkv": 2, "attn_out": 2, "mlp_up": 2, "mlp_down": 2, "lm_head": 1},
    "falcon": {"attn_qkv": 2, "attn_out": 2, "mlp_up": 2, "mlp_down": 2, "lm_head": 1},
    "bloom": {"attn_qkv": 2, "attn_out": 2, "mlp_up": 2, "mlp_down": 2, "lm_head": 1},
    "gptj": {"attn_qkv": 6, "attn_out": 2, "mlp_up": 2, "mlp_down": 2, "lm_head": 1},
    # shared_expert_gate (a 1-output gate) stays "other"; the routers are reported, not candidates
    "qwen2_moe": {"attn_qkv": 6, "attn_out": 2, "mlp_up": 4, "mlp_down": 2, "experts": 2, "other": 2, "lm_head": 1},
    "olmoe": {"attn_qkv": 6, "attn_out": 2, "experts": 2, "lm_head": 1},
    "gemma": {"attn_qkv": 6, "attn_out": 2, "mlp_up": 4, "mlp_down": 2, "lm_head": 1},
}
IDS = torch.tensor([[3, 17, 42, 99, 5, 64, 7, 120, 33, 2, 11, 80]])


def role_counts(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for c in find_candidates(model)[0]:
        counts[c.role] = counts.get(c.role, 0) + 1
    return counts


@pytest.mark.parametrize("arch", ARCHS + MORE_ARCHS)
def test_roles_per_architecture(arch):
    assert role_counts(tiny_model(arch)) == EXPECTED[arch]


def test_gpt2_c_proj_regression():
    """The prototype matched 'c_proj' as a substring: attention and MLP alike."""
    model = tiny_model("gpt2")
    roles = {c.name: c.role for c in find_candidates(model)[0]}
    assert roles["transformer.h.0.attn.c_proj"] == "attn_out"
    assert roles["transformer.h.0.mlp.c_proj"] == "mlp_down"
    apply_mx(model, MXConfig(roles=("mlp_down",)))
    mods = dict(model.named_modules())
    assert isinstance(mods["transformer.h.0.mlp.c_proj"], MXLayer)
    assert not isinstance(mods["transformer.h.0.attn.c_proj"], MXLayer)


def _q(t, scheme, rotation, axis=-1):
    if scheme is None:  # weight-only: the input is only rotated (when the configuration rotates)
        return t if rotation is None else rotate(t, rotation).to(t.dtype)
    return quantize(t, scheme, axis, rotation)


def _reference_linear(module_before, x, spec):
    """F.linear(quantize(rotate(x)), quantize(rotate(W))) from the original module's weights."""
    if type(module_before).__name__ == "Conv1D":
        w = _q(module_before.weight, spec.w, spec.rotation, axis=0)
        xq = _q(x, spec.a, spec.rotation)
        return torch.addmm(module_before.bias, xq.view(-1, xq.size(-1)), w).view(*x.shape[:-1], -1)
    return F.linear(_q(x, spec.a, spec.rotation), _q(module_before.weight, spec.w, spec.rotation), module_before.bias)


def _reference_experts(orig, x, top_k_index, top_k_weights, spec):
    """Per expert; each expert's weight is its own tensor (its own per-tensor scale), and the input is
    quantized once for all routed tokens before they are gathered."""
    out = torch.zeros_like(x)
    xq = _q(x, spec.a, spec.rotation)
    for e in range(orig.gate_up_proj.shape[0]):
        tok, slot = torch.where(top_k_index == e)
        if len(tok) == 0:
            continue
        gu, dn = _q(orig.gate_up_proj[e], spec.w, spec.rotation), _q(orig.down_proj[e], spec.w, spec.rotation)
        gate, up = F.linear(xq[tok], gu).chunk(2, dim=-1)
        h = F.linear(_q(orig.act_fn(gate) * up, spec.a, spec.rotation), dn) * top_k_weights[tok, slot, None]
        out.index_add_(0, tok, h)
    return out


SCHEME_CONFIGS = [
    {"format": "fp8_e4m3"},
    {"format": "fp4_e2m1"},
    {"format": "nvfp4"},
    {"format": "fp4_e2m1", "rotation": "hadamard", "rotation_seed": 5},
    {"format": "nvfp4", "rotation": "hadamard"},
    {"role_formats": "attn:mxfp8|mlp:nvfp4"},
    {"format": "nvfp4", "weight_only": True},
]


# One architecture per layer kind: nn.Linear (llama), GPT-2's Conv1D (gpt2), fused qkv/gate_up Linear (phi3), fused
# 3-D experts (mixtral). Each runs every scheme; every other architecture runs one scheme, in turn.
KIND_ARCHS = ("llama", "gpt2", "phi3", "mixtral")
OTHER_ARCHS = [a for a in ARCHS + MORE_ARCHS if a not in KIND_ARCHS]
LAYER_CASES = [(a, c) for a in KIND_ARCHS for c in SCHEME_CONFIGS] + [
    (a, SCHEME_CONFIGS[i % len(SCHEME_CONFIGS)]) for i, a in enumerate(OTHER_ARCHS)]


@pytest.mark.parametrize(("arch", "cfg"), LAYER_CASES,
                         ids=[f"{a}-{'-'.join(map(str, c.values()))}" for a, c in LAYER_CASES])
def test_every_layer_equals_reference(arch, cfg):
    """Each replaced layer's output is bit-identical to F.linear(quantize(x), quantize(W)), rotated first
    where the configuration rotates. Pairwise, not the full 7 schemes x 16 architectures: every scheme on every
    layer kind (Linear, Conv1D, fused qkv/gate_up, fused 3-D experts: KIND_ARCHS), and every architecture (its
    own blocks, norms, shared experts, parallel attention...) under one scheme, the schemes taken in turn so each
    also runs on several more architectures."""
    import copy

    model = tiny_model(arch)
    original = copy.deepcopy(model)
    config = parse_mx_args(cfg)[0]
    report = apply_mx(model, config)
    default_roles = ("attn_qkv", "attn_out", "mlp_up", "mlp_down", "experts")
    assert len(report.replaced) == sum(v for k, v in EXPECTED[arch].items() if k in default_roles)
    orig_mods = dict(original.named_modules())
    seen = {}

    def hook(name):
        def fn(mod, args, out):  # clone: models may update outputs in place (Falcon: mlp_output += attn)
            seen[name] = (tuple(a.clone() if torch.is_tensor(a) else a for a in args), out.clone())
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in mx_layers(model)]
    with torch.no_grad():
        model(IDS)
    for h in handles:
        h.remove()
    assert set(seen) == {e.name for e in report.replaced}
    specs = dict(mx_layers(model))
    for name, (args, out) in seen.items():
        before, spec = orig_mods[name], specs[name].mx_spec
        w_fmt, a_fmt = config.formats_for(specs[name].mx_role, name)
        assert spec.w == config.scheme(w_fmt) and (spec.rotation is not None) == ("rotation" in cfg)
        assert spec.a == (None if a_fmt is None else config.scheme(a_fmt))
        if "role_formats" in cfg:
            assert spec.w.name == ("nvfp4" if specs[name].mx_role in ("mlp_up", "mlp_down", "experts") else "fp8_e4m3")
        if type(before).__name__.endswith("Experts"):
            ref = _reference_experts(before, *args, spec)
        else:
            ref = _reference_linear(before, args[0], spec)
        assert torch.equal(out, ref), name


@pytest.mark.parametrize("arch", ARCHS)
def test_mlp_only_leaves_attention_untouched(arch):
    model = tiny_model(arch)
    before = {n: p.clone() for n, p in model.named_parameters()}
    apply_mx(model, parse_mx_args({"mlp_only": True})[0])
    roles = {layer.mx_role for _, layer in mx_layers(model)}
    assert roles and roles <= {"mlp_up", "mlp_down", "experts"}
    for name, p in model.named_parameters():
        if ".attn" in name or "attention" in name or "self_attn" in name:
            assert torch.equal(p, before[name]), name


def test_weights_quantized_once(monkeypatch):
    """The quantizer itself (not the layers' calls into the sibling cache) runs once per weight, at conversion,
    and in a forward once per distinct input: q/k/v share one, gate/up share one, o_proj and down_proj one each."""
    from lm_eval_mx.nn import spec as spec_module

    calls: list[torch.Tensor] = []
    orig = spec_module.get_quantizer

    def counting(name):
        quantizer = orig(name)
        return lambda x, *a, **k: calls.append(x) or quantizer(x, *a, **k)

    monkeypatch.setattr(spec_module, "get_quantizer", counting)
    orig_act = spec_module.get_act_quantizer

    def counting_act(name, scheme, rotation):  # the input quantizer, everything but x resolved
        quantizer = orig_act(name, scheme, rotation)
        return lambda x: calls.append(x) or quantizer(x)

    monkeypatch.setattr(spec_module, "get_act_quantizer", counting_act)
    model = tiny_model("llama")
    linears = {n: m.weight.shape for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    report = apply_mx(model, MXConfig())
    assert len(report.replaced) == len(linears) == 14
    assert sorted(tuple(x.shape) for x in calls) == sorted(tuple(s) for s in linears.values())  # each weight once
    weights = {p.data_ptr() for p in model.parameters()}
    calls.clear()
    with torch.no_grad():
        model(IDS)
        model(IDS)
    layers = len(model.model.layers)
    assert len(calls) == 2 * 4 * layers, [tuple(x.shape) for x in calls]
    assert not any(x.data_ptr() in weights for x in calls)  # no weight quantized again during forward
    assert all(x.shape[:-1] == IDS.shape for x in calls)  # activations only: (batch, tokens, features)


def test_torch_compile_traces_mx_layers_whole_and_exactly():
    """Under torch.compile (dynamo; the eager backend, so no kernel fusion changes float results) an MX model
    traces as one graph and computes exactly what it computes eagerly: the sibling-input cache, keyed by
    tensor identity, stays out of the trace (it would bake one layer's quantized input into another's). One
    configuration that exercises every traced path at once (it was three): E8M0 scales (attention in MXFP8),
    E4M3 block scales with a per-tensor amax (MLP in NVFP4), a block Hadamard rotation and its seeded signs."""
    model = tiny_model("llama")
    apply_mx(model, parse_mx_args({"role_formats": "attn:mxfp8|mlp:nvfp4", "rotation": "hadamard",
                                   "rotation_seed": 3})[0])
    with torch.no_grad():
        ref = model(IDS).logits
        explained = torch._dynamo.explain(model)(IDS)
        torch._dynamo.reset()
        out = torch.compile(model, backend="eager", fullgraph=True)(IDS).logits
    assert explained.graph_break_count == 0
    assert torch.equal(out, ref)


def test_mx_disabled_restores_baseline_exactly():
    base = tiny_model("qwen2")
    model = tiny_model("qwen2")
    with torch.no_grad():
        ref = base(IDS).logits
        apply_mx(model, MXConfig(w_format="fp4", a_format="fp4"), keep_original=True)
        mx = model(IDS).logits
        with mx_disabled(model):
            off = model(IDS).logits
        again = model(IDS).logits
    assert torch.equal(off, ref)
    assert not torch.equal(mx, ref)
    assert torch.equal(again, mx)


def test_inference_mode_inputs():
    model = tiny_model("llama")
    with torch.no_grad():
        ref = model(IDS).logits
    apply_mx(model, MXConfig())
    with torch.no_grad():
        a = model(IDS).logits
    with torch.inference_mode():
        b = model(IDS).logits
    assert torch.equal(a, b) and not torch.equal(a, ref)


def test_mx_disabled_needs_original():
    model = tiny_model("llama")
    apply_mx(model, MXConfig())
    with pytest.raises(RuntimeError, match="keep_original"), mx_disabled(model):
        pass


def test_roles_none_is_untouched():
    model = tiny_model("llama")
    report = apply_mx(model, parse_mx_args({"roles": "none"})[0])
    assert report.replaced == [] and not list(mx_layers(model))


def test_no_match_errors_list_modules():
    model = tiny_model("gpt2")
    with pytest.raises(SelectionError, match=r"include pattern 'nothing_here' matches no linear layer(.|\n)*attn_out: transformer\.h\.0\.attn\.c_proj"):
        apply_mx(model, parse_mx_args({"include": "nothing_here"})[0])
    with pytest.raises(SelectionError, match="selects no layer"):
        apply_mx(tiny_model("mixtral"), MXConfig(roles=("mlp_up",)))


def test_unrecognised_architecture_errors():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(32, 32) for _ in range(2)])

    with pytest.raises(SelectionError, match=r"other: blocks\.0, blocks\.1(.|\n)*include="):
        apply_mx(Odd(), MXConfig())
    report = apply_mx(Odd(), parse_mx_args({"include": r"blocks\.1"})[0])
    assert [e.name for e in report.replaced] == ["blocks.1"]


def test_include_exclude_and_role_formats():
    model = tiny_model("llama")
    cfg, rest = parse_mx_args({"roles": "all", "exclude": r"layers\.0\.", "role_formats": "mlp:fp4|attn:fp8_e5m2",
                               "device": "cpu"})
    assert rest == {"device": "cpu"}
    report = apply_mx(model, cfg)
    assert all(".layers.1." in e.name for e in report.replaced) and len(report.replaced) == 7
    fm = {e.role: e.w_format for e in report.replaced}
    assert fm["mlp_up"] == "fp4_e2m1" and fm["attn_qkv"] == "fp8_e5m2"
    s = report.summary()
    assert s["layers_per_role"] == {"attn_out": 1, "attn_qkv": 3, "mlp_down": 1, "mlp_up": 2}
    assert 0 < s["coverage_pct"] < 100
    text = report.table()
    assert "mlp_up" in text and "in MX" in text


def test_lm_head_tied_is_not_quantized_behind_back():
    model = tiny_model("gpt2")
    emb = model.get_input_embeddings().weight.clone()
    report = apply_mx(model, parse_mx_args({"roles": "lm_head"})[0])
    assert [e.role for e in report.replaced] == ["lm_head"]
    assert torch.equal(model.get_input_embeddings().weight, emb)
    assert not torch.equal(model.lm_head.weight, emb)
    assert any("input embeddings" in n for n in report.notes)


def test_weight_only_and_bf16():
    model = tiny_model("llama", dtype=torch.bfloat16)
    apply_mx(model, MXConfig(weight_only=True, roles=("mlp_down",)))
    layer = model.model.layers[0].mlp.down_proj
    assert layer.weight.dtype == torch.bfloat16
    x = torch.randn(3, 96, dtype=torch.bfloat16)
    assert torch.equal(layer(x), F.linear(x, layer.weight))


def test_config_validation_messages():
    with pytest.raises(ValueError, match="valid formats"):
        parse_mx_args({"w_format": "fp9"})
    with pytest.raises(ValueError, match="block_size must be an integer >= 0"):
        parse_mx_args({"block_size": -4})
    with pytest.raises(ValueError, match="mlp_only must be True or False"):
        parse_mx_args({"mlp_only": "Ture"})
    with pytest.raises(ValueError, match="unknown role 'mlpp'"):
        parse_mx_args({"roles": "mlpp"})
    with pytest.raises(ValueError, match="choose one way"):
        parse_mx_args({"mlp_only": True, "attn_only": True})
    with pytest.raises(ValueError, match="invalid regular expression"):
        parse_mx_args({"include": "("})
    cfg, _ = parse_mx_args({"format": "mxfp4", "block_size": "16", "roles": ["attn", "mlp_down"]})
    assert (cfg.w_format, cfg.a_format, cfg.block_size) == ("fp4_e2m1", "fp4_e2m1", 16)
    assert cfg.roles == ("attn_qkv", "attn_out", "mlp_down")
    assert MXConfig(**{k: v for k, v in cfg.to_dict().items()}) == cfg


def test_accelerate_hook_kept():
    from accelerate.hooks import ModelHook, add_hook_to_module

    class Count(ModelHook):
        n = 0

        def pre_forward(self, module, *args, **kwargs):
            Count.n += 1
            return args, kwargs

    model = tiny_model("llama")
    add_hook_to_module(model.model.layers[0].mlp.down_proj, Count())
    apply_mx(model, MXConfig())
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(2, 96)
    out = layer(x)
    assert Count.n == 1
    assert torch.equal(out, F.linear(quantize_mx(x, "fp8"), layer.weight))


@pytest.mark.parametrize("args, match", [
    ({"layer_formats": ".*:fp4", "role_formats": "mlp:fp8"}, "role_formats mlp would be ignored"),
    ({"layer_formats": ".*:fp4", "format": "int8"}, "format would be ignored"),
    ({"layer_formats": ".*:nvfp4", "scale_mode": "ceil"}, "scale_mode would be ignored"),
    ({"layer_formats": ".*:bf16"}, "layer_formats keeps every selected layer in high precision"),
    ({"role_formats": "attn:fp8|mlp:fp8", "format": "fp4"}, "format would be ignored"),
    ({"role_formats": "attn:fp8|mlp_up:fp8", "layer_formats": "down_proj:int8", "w_format": "fp4"},
     "w_format would be ignored"),
])
def test_keys_that_layer_rules_leave_unused_are_refused(args, match):
    """Once layer_formats rules decide every layer a key could act on, the key is refused, not dropped."""
    with pytest.raises(SelectionError, match=match):
        apply_mx(tiny_model("llama"), parse_mx_args(args)[0])


def test_format_used_by_the_roles_role_formats_leaves_or_by_the_attention_matmuls():
    apply_mx(tiny_model("llama"), parse_mx_args({"role_formats": "mlp:fp8", "format": "fp4"})[0])  # attention: fp4
    report = apply_mx(tiny_model("llama"), parse_mx_args({"role_formats": "attn:fp8|mlp:fp8", "format": "fp4",
                                                          "attn_bmm": True})[0])
    assert report.attn_bmm == "fp4_e2m1"  # format's a_format feeds the attention matmuls
    for args in ({"role_formats": "all:nvfp4", "attn_bmm": True, "bmm_format": "fp8", "scale_mode": "ceil"},
                 {"weight_only": True, "w_format": "nvfp4", "attn_bmm": True, "a_format": "fp8", "scale_mode": "ceil"}):
        assert apply_mx(tiny_model("llama"), parse_mx_args(args)[0]).attn_bmm == "fp8_e4m3"  # scale_mode: E8M0 bmm


def test_rules_and_keys_together():
    model = tiny_model("llama")
    report = apply_mx(model, parse_mx_args({"layer_formats": r"mlp:nvfp4", "format": "int8", "scale_mode": "ceil"})[0])
    formats = {e.name.split(".", 3)[-1]: e.w_format for e in report.replaced}
    assert formats["mlp.down_proj"] == "nvfp4" and formats["self_attn.q_proj"] == "int8"


@pytest.mark.parametrize("arch, args, match", [
    # issue 25 item 9: a rotation that rotates nothing
    ("mixtral", {"rotation": "hadamard", "rotation_roles": "mlp_up"},
     "rotation=hadamard rotates no matmul here: rotation_roles=mlp_up has no layer in MX"),
    ("llama", {"roles": "mlp", "rotation": "hadamard", "rotation_roles": "experts"}, "rotates no matmul here"),
    ("llama", {"layer_formats": "mlp:bf16", "rotation": "hadamard", "rotation_roles": "mlp"},
     "rotates no matmul here"),
    ("mixtral", {"rotation": "hadamard", "rotation_roles": "attn_qkv|mlp_up"},
     "rotation_roles names mlp_up, but no layer of MixtralForCausalLM with that role is in MX"),
    # item 10: a role named in roles that selects no layer
    ("mixtral", {"roles": "router|experts"}, r"roles names router, but no layer of MixtralForCausalLM with that role "
                                             r"is selected .*Roles of this model's linear layers: attn_out, attn_qkv, "
                                             r"experts, lm_head; kept in high precision: .*router module"),
    ("llama", {"roles": "attn|experts"}, "roles names experts, but no layer of LlamaForCausalLM"),
    ("llama", {"roles": "attn|mlp", "include": "self_attn"}, "roles names mlp, but no layer"),
    # item 11: exclude matching no selected layer
    ("llama", {"roles": "mlp", "exclude": "q_proj"}, "exclude pattern 'q_proj' matches no selected layer"),
    # item 13: block_size has no effect once the rules make every layer nvfp4
    ("llama", {"layer_formats": ".*:nvfp4", "block_size": 16}, "block_size would be ignored: every format in use"),
])
def test_settings_that_select_or_rotate_nothing_are_refused(arch, args, match):
    from lm_eval_mx.selection.apply import check_config

    model = tiny_model(arch)
    with pytest.raises(SelectionError, match=match):
        check_config(model, parse_mx_args(args)[0])
    with pytest.raises(SelectionError, match=match):
        apply_mx(model, parse_mx_args(args)[0])


def test_role_groups_and_defaults_need_only_one_role_present():
    """roles=all/mlp on a dense model (no experts) and rotation_roles=mlp are fine: a group needs one role."""
    report = apply_mx(tiny_model("llama"), parse_mx_args({"roles": "mlp|attn", "rotation": "hadamard",
                                                          "rotation_roles": "mlp", "exclude": "down_proj"})[0])
    assert {e.role for e in report.replaced if e.rotation} == {"mlp_up"}
    assert apply_mx(tiny_model("mixtral"), parse_mx_args({"mlp_only": True})[0]).replaced

"""GPTQ of fused MoE experts and lm_head (lm_eval_mx.algorithms.gptq_moe via quantize_model.run_gptq) against a plain
reference written here: each expert's tokens picked from the router's top-k with ``torch.where``, its Hessian from those
tokens only, gate_up before down (down's inputs from the quantized gate_up, ``silu(gate) * up`` written out), the
next block calibrated on the quantized one; lm_head on the final hidden states of the quantized model."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model

from lm_eval_mx.algorithms.gptq import GPTQOptions, HessianAccumulator, gptq_weight, unrotate
from lm_eval_mx.algorithms.quantize_model import plan, quantize_model, run_gptq
from lm_eval_mx.nn.layers import MXPackedLayer
from lm_eval_mx.numerics.packing import unpack_mx
from lm_eval_mx.numerics.quantize import quantize_torch
from lm_eval_mx.selection.config import parse_mx_args

pytestmark = pytest.mark.usefixtures("one_thread")

OPTS = GPTQOptions(block_columns=32)
DATA = Path(__file__).parent / "data"
BATCH = 4


def _ids(n: int = 16, seqlen: int = 32, vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(0))


def _capture_experts(model, block: int, ids: torch.Tensor):
    """(hidden_states, top_k_index) the experts of ``block`` receive, one pair per batch, from a plain forward."""
    seen = []
    experts = model.model.layers[block].mlp.experts
    handle = experts.register_forward_pre_hook(lambda _m, args: seen.append((args[0].clone(), args[1].clone())))
    with torch.no_grad():
        for i in range(0, ids.shape[0], BATCH):
            model(ids[i:i + BATCH], use_cache=False)
    handle.remove()
    return seen


def _hessian(chunks, n_in, rotation):
    acc = HessianAccumulator(n_in, rotation)
    for x in chunks:
        if x.shape[0]:
            acc.add(x)
    return acc


def _write(view, result, rotation):
    """Write ``result`` into ``view``, an expert's [out, in] view of its fused weight."""
    w = result.weight if rotation is None else unrotate(result.weight, rotation)
    with torch.no_grad():
        view.copy_(w.to(view.dtype))


def _expert_weight(param, e, oss):
    """Expert ``e`` of a fused weight as [out, in]: gpt-oss holds [E, in, out] (``x @ W``), the others [E, out, in]."""
    return param[e].T if oss else param[e]


def _gptoss_gate(h, limit, alpha=1.702, interleaved=True):
    """gpt-oss's activation written out: gate and up interleaved (even, odd columns), clamped, ``(up + 1) · glu``."""
    gate, up = (h[..., ::2], h[..., 1::2]) if interleaved else h.chunk(2, dim=-1)
    gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def _down_input(experts, e, x, oss, bias=True, interleaved=True):
    """The input of expert ``e``'s down_proj: Mixtral ``silu(gate) · up`` of ``x Wᵀ``; gpt-oss ``x W + b`` gated."""
    if not oss:
        gate, up = F.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
        return F.silu(gate) * up
    h = x @ experts.gate_up_proj[e]
    h = h + experts.gate_up_proj_bias[e] if bias else h
    return _gptoss_gate(h, experts.limit, interleaved=interleaved)


def _reference(model, scheme, rotation, ids, min_tokens=None, pooled=False, down_first=False, oss=False, **bug):
    """The plain loop: expert results by name, the model left fake-quantized; ``oss``: gpt-oss's experts
    (``bug``: :func:`_down_input`'s switches, each one a planted bug)."""
    out = {}
    for b, layer in enumerate(model.model.layers):
        experts = layer.mlp.experts
        n_exp = experts.gate_up_proj.shape[0]
        stages = [("down_proj", True), ("gate_up_proj", False)] if down_first else [("gate_up_proj", False),
                                                                                     ("down_proj", True)]
        for name, second in stages:
            batches = _capture_experts(model, b, ids)  # the model's own router, on the quantized blocks before
            param = getattr(experts, name)
            for e in range(n_exp):
                chunks = []
                for hidden, index in batches:
                    tokens = torch.where(index == e)[0] if not pooled else torch.arange(hidden.shape[0])
                    x = hidden[tokens]
                    chunks.append(_down_input(experts, e, x, oss, **bug) if second else x)
                w = _expert_weight(param, e, oss)
                acc = _hessian(chunks, w.shape[1], rotation)
                need = w.shape[1] if min_tokens is None else min_tokens
                if acc.tokens < need:
                    res = gptq_weight(w, torch.eye(w.shape[1]), scheme, rotation, GPTQOptions(damp=0.0))
                    res.fallback = "rtn"
                else:
                    res = gptq_weight(w, acc.hessian(), scheme, rotation, OPTS)
                res.tokens = acc.tokens
                out[f"model.layers.{b}.mlp.experts.{name}.{e}"] = res
                _write(_expert_weight(param, e, oss), res, rotation)
    return out


@pytest.mark.parametrize("fmt,rotation", [("mxfp4", None), ("nvfp4", "hadamard")])
def test_experts_equal_plain_reference(fmt, rotation):
    model = tiny_model("mixtral")
    ref_model = copy.deepcopy(model)
    keys = {"format": fmt, "roles": "experts"} | ({"rotation": rotation} if rotation else {})
    config = parse_mx_args(keys)[0]
    ids = _ids()
    planned = plan(model, config, "gptq")
    spec = planned[0].spec
    got = run_gptq(model, planned, ids, OPTS, batch_size=BATCH)
    ref = _reference(ref_model, spec.w, spec.rotation, ids)
    assert got.keys() == ref.keys() and len(got) == 2 * 2 * 4
    for name, r in ref.items():
        assert torch.equal(got[name].weight.view(torch.int32), r.weight.view(torch.int32)), name
        assert torch.equal(got[name].packed.codes, r.packed.codes), name
        assert got[name].tokens == r.tokens and got[name].fallback is None, name
        assert got[name].hessian_error < got[name].rtn_hessian_error, name
    assert sum(got[f"model.layers.0.mlp.experts.down_proj.{e}"].tokens for e in range(4)) == 16 * 32 * 2  # top-2
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)


def test_planted_bugs_differ_from_engine():
    """A Hessian pooled over all tokens, or down before gate_up, gives other codes: the reference sees routing and order."""
    model = tiny_model("mixtral")
    config = parse_mx_args({"format": "mxfp4", "roles": "experts"})[0]
    ids = _ids()
    engine = copy.deepcopy(model)
    got = run_gptq(engine, plan(engine, config, "gptq"), ids, OPTS, batch_size=BATCH)
    for bug in ({"pooled": True}, {"down_first": True}):
        ref = _reference(copy.deepcopy(model), plan(model, config, "gptq")[0].spec.w, None, ids, **bug)
        assert any(not torch.equal(got[n].packed.codes, r.packed.codes) for n, r in ref.items()), bug


def test_expert_fallback_and_packed_codes():
    """Experts under min_tokens are rounded to nearest (recorded with their token counts); the packed experts hold
    exactly the codes each expert's GPTQ (or RTN) chose."""
    model = tiny_model("mixtral")
    ref_model = copy.deepcopy(model)
    config = parse_mx_args({"format": "mxfp4", "roles": "experts"})[0]
    ids = _ids()
    got = quantize_model(model, config, "gptq", ids, GPTQOptions(block_columns=32, expert_min_tokens=260),
                         batch_size=BATCH)
    spec = plan(ref_model, config, "gptq")[0].spec
    ref = _reference(ref_model, spec.w, None, ids, min_tokens=260)
    rows = {r["name"]: r for r in got.layers}
    fallbacks = 0
    for b in range(2):
        row = rows[f"model.layers.{b}.mlp.experts"]
        module = model.model.layers[b].mlp.experts
        assert isinstance(module, MXPackedLayer)
        for item in row["experts"]:
            r = ref[f"model.layers.{b}.mlp.experts.{item['weight']}.{item['expert']}"]
            assert item["tokens"] == r.tokens and (item["fallback"] is None) == (r.tokens >= 260)
            packed = module.mx_packed(item["weight"], item["expert"])
            assert torch.equal(packed.codes, r.packed.codes) and torch.equal(packed.scales, r.packed.scales)
            if item["fallback"]:
                fallbacks += 1
                w0 = getattr(tiny_model("mixtral").model.layers[b].mlp.experts, item["weight"])[item["expert"]]
                assert b == 1 or torch.equal(unpack_mx(packed), quantize_torch(w0, spec.w))  # RTN of the original
        assert row["experts_rounded_to_nearest"] == sum(i["fallback"] is not None for i in row["experts"])
    assert 0 < fallbacks < 16  # some experts of the tiny model get fewer than 260 of the 1024 routed tokens


def test_lm_head_on_final_hidden_states():
    model = tiny_model("mixtral")
    ref_model = copy.deepcopy(model)
    config = parse_mx_args({"format": "nvfp4", "roles": "lm_head"})[0]
    ids = _ids()
    planned = plan(model, config, "gptq")
    assert [p.candidate.name for p in planned] == ["lm_head"] and planned[0].block is None
    got = run_gptq(model, planned, ids, OPTS, batch_size=BATCH)["lm_head"]
    seen = []
    handle = ref_model.lm_head.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        for i in range(0, ids.shape[0], BATCH):
            ref_model(ids[i:i + BATCH], use_cache=False)
    handle.remove()
    ref = gptq_weight(ref_model.lm_head.weight, _hessian(seen, 64, None).hessian(), planned[0].spec.w, None, OPTS)
    assert torch.equal(got.weight.view(torch.int32), ref.weight.view(torch.int32))
    assert got.tokens == 16 * 32 and got.hessian_error < got.rtn_hessian_error
    assert torch.equal(model.lm_head.weight, ref.weight)


def _tiny_gptoss():
    """gpt-oss's structure at tiny size (tests/data/make_gptoss_fixture.py's config), float32, random weights; the
    expert biases drawn too (HF inits them to zero) and the swiglu clamp lowered to 1.0 so it bites."""
    from transformers import AutoModelForCausalLM

    from lm_eval_mx.hf.testing import randomize_

    spec = importlib.util.spec_from_file_location("make_gptoss_fixture", DATA / "make_gptoss_fixture.py")
    fixture = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fixture)
    cfg = fixture.config()
    cfg.swiglu_limit = 1.0
    torch.manual_seed(0)
    model = randomize_(AutoModelForCausalLM.from_config(cfg, dtype=torch.float32), 0.2, 0).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in model.model.layers:
            for bias in (layer.mlp.experts.gate_up_proj_bias, layer.mlp.experts.down_proj_bias):
                bias.copy_(torch.randn(bias.shape, generator=g) * 0.5)
    return model


def _assert_codes_equal(got, ref):
    assert got.keys() == ref.keys()
    for name, r in ref.items():
        assert torch.equal(got[name].weight.view(torch.int32), r.weight.view(torch.int32)), name
        assert torch.equal(got[name].packed.codes, r.packed.codes), name
        assert got[name].tokens == r.tokens and got[name].fallback is None, name


def test_gptoss_experts_equal_plain_reference():
    """gpt-oss's experts (transformers' GptOssExperts: [E, in, out] weights, ``x @ W``, biases, interleaved gate/up
    with its clamped activation): quantize_model's GPTQ equals the plain loop, codes and packed layer; the reference
    with the bias dropped or gate/up split in halves gives other codes."""
    model = _tiny_gptoss()
    clean = copy.deepcopy(model)
    config = parse_mx_args({"format": "mxfp4", "roles": "experts"})[0]
    ids = _ids(8, 32, vocab=64)
    got = quantize_model(model, config, "gptq", ids, OPTS, batch_size=BATCH)
    spec = plan(clean, config, "gptq")[0].spec
    ref_model = copy.deepcopy(clean)
    ref = _reference(ref_model, spec.w, None, ids, oss=True)
    assert len(ref) == 2 * 2 * 4
    experts = clean.model.layers[0].mlp.experts
    x = torch.cat([hidden for hidden, _ in _capture_experts(clean, 0, ids)])
    h = x @ experts.gate_up_proj[0] + experts.gate_up_proj_bias[0]
    assert (h[:, ::2] > 1.0).any() and (h[:, 1::2].abs() > 1.0).any()  # the clamps of gate and up bite
    rows = {r["name"]: r for r in got.layers}
    for b in range(2):
        module = model.model.layers[b].mlp.experts
        assert isinstance(module, MXPackedLayer)
        for item in rows[f"model.layers.{b}.mlp.experts"]["experts"]:
            r = ref[f"model.layers.{b}.mlp.experts.{item['weight']}.{item['expert']}"]
            assert item["tokens"] == r.tokens and item["fallback"] is None
            packed = module.mx_packed(item["weight"], item["expert"])
            assert torch.equal(packed.codes, r.packed.codes) and torch.equal(packed.scales, r.packed.scales)
    assert sum(ref[f"model.layers.0.mlp.experts.down_proj.{e}"].tokens for e in range(4)) == 8 * 32 * 2  # top-2
    for bug in ({"bias": False}, {"interleaved": False}):
        wrong = _reference(copy.deepcopy(clean), spec.w, None, ids, oss=True, **bug)
        assert any(not torch.equal(ref[n].packed.codes, w.packed.codes) for n, w in wrong.items()), bug

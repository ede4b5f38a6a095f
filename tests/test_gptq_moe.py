"""GPTQ of fused MoE experts and lm_head (lm_eval_mx.algorithms.gptq_moe via quantize_model.run_gptq) against a plain
reference written here: each expert's tokens picked from the router's top-k with ``torch.where``, its Hessian from those
tokens only, gate_up before down (down's inputs from the quantized gate_up, ``silu(gate) * up`` written out), the
next block calibrated on the quantized one; lm_head on the final hidden states of the quantized model."""

from __future__ import annotations

import copy

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
BATCH = 4


def _ids(n: int = 16, seqlen: int = 32) -> torch.Tensor:
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(0))


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


def _write(param, e, result, rotation):
    w = result.weight if rotation is None else unrotate(result.weight, rotation)
    with torch.no_grad():
        param[e].copy_(w.to(param.dtype))


def _reference(model, scheme, rotation, ids, min_tokens=None, pooled=False, down_first=False):
    """The plain loop: expert results by name, the model left fake-quantized."""
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
                    if second:
                        gate, up = F.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
                        x = F.silu(gate) * up
                    chunks.append(x)
                acc = _hessian(chunks, param.shape[2], rotation)
                need = param.shape[2] if min_tokens is None else min_tokens
                if acc.tokens < need:
                    res = gptq_weight(param[e], torch.eye(param.shape[2]), scheme, rotation, GPTQOptions(damp=0.0))
                    res.fallback = "rtn"
                else:
                    res = gptq_weight(param[e], acc.hessian(), scheme, rotation, OPTS)
                res.tokens = acc.tokens
                out[f"model.layers.{b}.mlp.experts.{name}.{e}"] = res
                _write(param, e, res, rotation)
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

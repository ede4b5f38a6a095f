"""RTN vs GPTQ per expert on a tiny Mixtral built here (random weights, no download): for each expert, on held-out
tokens routed to it by the unquantized model, the relative output error ``‖X Wᵀ - X Ŵᵀ‖ / ‖X Wᵀ‖`` of its
``gate_up_proj``, and of the whole expert (``down(silu(gate) · up)`` with both weights quantized against the
original expert); and the relative logit error of the whole model.

Calibration: ``--nsamples`` x ``--seqlen`` random token ids (seed 0); held-out: as many with seed 1. The inputs of
each expert are those the original model's router sends it (``down_proj``'s: the gated intermediate of the original
``gate_up_proj``), so RTN and GPTQ are measured on the same inputs.

    python benchmarks/gptq_moe_table.py --format mxfp4 --out benchmarks/results/gptq_moe_mxfp4.json
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
import torch.nn.functional as F


def build(seed: int = 0) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, MixtralConfig

    from lm_eval_mx.hf.testing import randomize_

    config = MixtralConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, num_local_experts=8,
                           num_experts_per_tok=2)
    torch.manual_seed(seed)
    return randomize_(AutoModelForCausalLM.from_config(config, dtype=torch.float32), 0.2, seed).eval()


def expert_inputs(model: torch.nn.Module, ids: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """(hidden_states, top_k_index) each block's experts receive on ``ids`` (the unquantized model)."""
    seen: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    hooks = [layer.mlp.experts.register_forward_pre_hook(
        lambda _m, args, i=i: seen.setdefault(i, []).append((args[0], args[1]))) for i, layer in
        enumerate(model.model.layers)]
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in hooks:
        h.remove()
    return {i: (torch.cat([a for a, _ in v]), torch.cat([b for _, b in v])) for i, v in seen.items()}


def rel(ref: torch.Tensor, got: torch.Tensor) -> float:
    return float(torch.linalg.norm(ref - got) / torch.linalg.norm(ref))  # under no_grad: plain floats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--format", default="mxfp4", choices=("mxfp4", "nvfp4"))
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=64)
    p.add_argument("--out", default=None)
    ns = p.parse_args()
    torch.set_num_threads(1)
    from lm_eval_mx.algorithms.gptq import GPTQOptions
    from lm_eval_mx.algorithms.quantize_model import quantize_model
    from lm_eval_mx.selection.config import parse_mx_args

    base = build()
    calib = torch.randint(0, 512, (ns.nsamples, ns.seqlen), generator=torch.Generator().manual_seed(0))
    held = torch.randint(0, 512, (ns.nsamples // 2, ns.seqlen), generator=torch.Generator().manual_seed(1))
    config = parse_mx_args({"format": ns.format, "roles": "experts", "weight_only": True})[0]
    models, reports = {}, {}
    for method in ("rtn", "gptq"):
        m = copy.deepcopy(base)
        run = quantize_model(m, config, method, calib if method == "gptq" else None, GPTQOptions(), batch_size=8)
        models[method], reports[method] = m, {r["name"]: r for r in run.layers}
    inputs = expert_inputs(base, held)
    rows = []
    torch.set_grad_enabled(False)
    for b, layer in enumerate(base.model.layers):
        experts = layer.mlp.experts
        hidden, index = inputs[b]
        gptq_row = reports["gptq"][f"model.layers.{b}.mlp.experts"]
        calib_tokens = {(x["weight"], x["expert"]): x["tokens"] for x in gptq_row["experts"]}
        for e in range(experts.gate_up_proj.shape[0]):
            x = hidden[(index == e).any(-1)]
            gu = experts.gate_up_proj[e]
            gate, up = F.linear(x, gu).chunk(2, dim=-1)
            h = F.silu(gate) * up
            row = {"block": b, "expert": e, "calibration_tokens": calib_tokens[("gate_up_proj", e)],
                   "held_out_tokens": int(x.shape[0])}
            for method, m in models.items():
                q = m.model.layers[b].mlp.experts
                gu_q = q.mx_weight("gate_up_proj")[e].float()
                dn_q = q.mx_weight("down_proj")[e].float()
                row[f"gate_up {method}"] = rel(F.linear(x, gu), F.linear(x, gu_q))
                g_q, u_q = F.linear(x, gu_q).chunk(2, dim=-1)
                row[f"expert {method}"] = rel(F.linear(h, experts.down_proj[e]), F.linear(F.silu(g_q) * u_q, dn_q))
            rows.append(row)
    with torch.no_grad():
        ref = base(held).logits
        logits = {m: rel(ref, models[m](held).logits) for m in models}
    print(f"Tiny Mixtral (hidden 128, 8 experts, top-2, 2 blocks, random weights), experts in {ns.format} "
          f"(weights only), {ns.nsamples}x{ns.seqlen} calibration tokens; relative output error on held-out tokens\n")
    print("| block | expert | calib. tokens | held-out tokens | gate_up RTN | gate_up GPTQ | expert RTN | expert GPTQ |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['block']} | {r['expert']} | {r['calibration_tokens']} | {r['held_out_tokens']} | "
              f"{r['gate_up rtn']:.4f} | {r['gate_up gptq']:.4f} | {r['expert rtn']:.4f} | {r['expert gptq']:.4f} |")
    print(f"\nwhole model, relative logit error: RTN {logits['rtn']:.4f}, GPTQ {logits['gptq']:.4f}")
    if ns.out:
        with open(ns.out, "w") as f:
            json.dump({"format": ns.format, "rows": rows, "logit_error": logits}, f, indent=1)


if __name__ == "__main__":
    main()

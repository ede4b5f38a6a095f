"""Roles by module structure, not substrings: which linear layers a causal LM has and what each does.

A layer's role comes from its own name *and* the block it sits in: GPT-2's
``attn.c_proj`` is ``attn_out`` while ``mlp.c_proj`` is ``mlp_down`` (a substring
rule would quantize both as one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..nn.layers import MXConv1D, MXExperts, MXLayer, MXLinear

_ATTN_BLOCKS = {"attn", "self_attn", "attention", "self_attention", "crossattention", "mixer", "attn_layer"}


_MLP_BLOCKS = {"mlp", "ffn", "feed_forward", "feedforward", "block_sparse_moe", "moe", "ff", "shared_expert", "shared_experts"}


_QKV = {
    "q_proj", "k_proj", "v_proj", "qkv_proj", "wqkv", "c_attn", "query_key_value", "query", "key",
    "value", "in_proj", "qkv", "w_pack", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj",
    "kv_proj", "q", "k", "v",
}


_ATTN_OUT = {"o_proj", "out_proj", "dense", "c_proj", "wo", "o", "proj"}


_UP = {"gate_proj", "up_proj", "gate_up_proj", "c_fc", "fc1", "w1", "w3", "fc_in", "dense_h_to_4h", "wi", "wi_0", "wi_1"}


_DOWN = {"down_proj", "c_proj", "fc2", "w2", "fc_out", "dense_4h_to_h", "wo"}


_ROUTERS = {"router", "gate", "router_gate"}


_UNAMBIGUOUS = (
    dict.fromkeys(_QKV - {"q", "k", "v", "query", "key", "value", "qkv", "in_proj"}, "attn_qkv")
    | dict.fromkeys(("o_proj", "out_proj"), "attn_out")
    | dict.fromkeys(_UP - {"wi", "wi_0", "wi_1", "w1", "w3"}, "mlp_up")
    | dict.fromkeys(_DOWN - {"c_proj", "wo", "w2"}, "mlp_down")
)


MIXINS: dict[str, type[MXLayer]] = {"linear": MXLinear, "conv1d": MXConv1D, "experts": MXExperts}


@dataclass
class Candidate:
    """A linear-like layer: its name, module, kind (linear/conv1d/experts) and role."""

    name: str
    module: nn.Module
    kind: str
    role: str

    @property
    def numel(self) -> int:
        mixin = MIXINS[self.kind]
        return sum(getattr(self.module, n).numel() for n in mixin.MX_WEIGHTS if isinstance(getattr(self.module, n, None), torch.Tensor))




def _kind(module: nn.Module) -> str | None:
    if isinstance(module, MXLayer):
        return None
    if isinstance(module, nn.Linear):
        return "linear"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return "conv1d"
    down = getattr(module, "down_proj", None)
    up = getattr(module, "gate_up_proj", getattr(module, "up_proj", None))
    if isinstance(down, nn.Parameter) and isinstance(up, nn.Parameter) and down.dim() == 3 and up.dim() == 3:
        return "experts"
    return None


def classify(name: str, module: nn.Module, kind: str, parent: nn.Module | None, lm_head: nn.Module | None) -> str:
    """The role of one linear-like layer (see ``config.ROLES``)."""
    parts = [p for p in name.split(".") if p != "base_layer"]  # PEFT wraps the original as base_layer
    leaf = parts[-1].lower() if parts else ""
    if module is lm_head:
        return "lm_head"
    if kind == "experts" or "experts" in parts[:-1]:
        return "experts"
    if leaf in _ROUTERS and (leaf != "gate" or (parent is not None and hasattr(parent, "experts"))):
        return "router"
    for block in reversed(parts[:-1]):
        b = block.lower()
        if b in _ATTN_BLOCKS:
            return "attn_qkv" if leaf in _QKV else "attn_out" if leaf in _ATTN_OUT else "other"
        if b in _MLP_BLOCKS:
            return "mlp_up" if leaf in _UP else "mlp_down" if leaf in _DOWN else "other"
    # No enclosing block (e.g. OPT's decoder-layer fc1/fc2): names that mean one thing anywhere.
    return _UNAMBIGUOUS.get(leaf, "other")


def find_candidates(model: nn.Module) -> tuple[list[Candidate], list[tuple[str, str]]]:
    """Every linear-like layer with its role, and (name, reason) of layers never quantizable."""
    get_out = getattr(model, "get_output_embeddings", None)
    lm_head = get_out() if callable(get_out) else None
    modules = dict(model.named_modules())
    out: list[Candidate] = []
    unusable: list[tuple[str, str]] = []
    for name, module in modules.items():
        kind = _kind(module)
        if kind is None:
            if type(module).__name__.endswith("Router") and getattr(module, "weight", None) is not None:
                unusable.append((name, "router module with its own forward (kept in high precision)"))
            continue
        if any(p.startswith("lora_") for p in name.split(".")):
            unusable.append((name, "PEFT adapter layer (kept in high precision)"))
            continue
        parent = modules.get(name.rpartition(".")[0]) if "." in name else model
        role = classify(name, module, kind, parent, lm_head)
        bad = [n for n in MIXINS[kind].MX_WEIGHTS if isinstance(getattr(module, n, None), torch.Tensor)
               and not getattr(module, n).is_floating_point()]
        if bad:
            unusable.append((name, f"weight {bad[0]} is {getattr(module, bad[0]).dtype}, already quantized"))
            continue
        if kind == "experts" and getattr(module, "has_post_expert_norm", False):
            unusable.append((name, "experts with a post-expert norm are not supported"))
            continue
        out.append(Candidate(name, module, kind, role))
    return out, unusable

"""MX attention matmuls: Q·Kᵀ and P·V on MX-quantized operands, as a transformers attention function.

Registered with transformers' ``AttentionInterface`` (and its mask interface, with
eager masks) under the name ``mx_eager``: no model class is patched, and every
architecture that dispatches attention through the interface is supported.
Operands are quantized along each matmul's reduction axis: Q and K along the head
dimension (rotated first when the configuration rotates ``attn_bmm``: the scores are
unchanged without quantization), the probabilities P along the key axis, V along its
sequence axis.
Softmax and masking stay in float32. Keys that no query may attend (padding) are
zeroed in V before quantization, so padding never changes a real block's scale.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .spec import MXSpec

NAME = "mx_eager"


@dataclass
class _State:
    spec: MXSpec
    enabled: bool
    original: str | None


# One entry per model config (attention modules reach it through ``module.config``).
_STATES: dict[int, _State] = {}


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def mx_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention with MX operands; returns (output [B, T, H, D], probabilities)."""
    state = _STATES.get(id(module.config))
    if state is None:
        raise RuntimeError(
            f"{type(module).__name__} is set to '{NAME}' attention but its model has no MX attention state "
            "(a copy of an MX model?): apply_mx(model, config) to the model that runs"
        )
    spec = state.spec if state.enabled else None
    groups = query.shape[1] // key.shape[1]
    k = _repeat_kv(key, groups)
    v = _repeat_kv(value, groups)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    q = query
    if spec is not None:
        scheme, quantize = spec.a, spec.quantizer
        assert scheme is not None
        q, k = quantize(query, scheme, -1, spec.rotation), quantize(k, scheme, -1, spec.rotation)
    scores = torch.matmul(q, k.transpose(2, 3)).float() * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        mask = attention_mask[:, :, :, : k.shape[-2]]
        scores = scores + mask.float()
    probs = torch.softmax(scores, dim=-1).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    if spec is not None:
        if attention_mask is not None:  # keys no query can see: zero them so they never set a scale
            dead = (mask == torch.finfo(mask.dtype).min).all(dim=-2, keepdim=True)  # [B, 1|H, 1, K]
            v = v.masked_fill(dead.transpose(-1, -2), 0)
        out = torch.matmul(quantize(probs, scheme, -1), quantize(v, scheme, -2))
    else:
        out = torch.matmul(probs, v)
    return out.transpose(1, 2).contiguous(), probs


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(NAME, mx_attention_forward)
    AttentionMaskInterface.register(NAME, eager_mask)


def head_dim(model: nn.Module) -> int:
    """The attention head dimension of a transformers model (the reduction axis of Q·Kᵀ)."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    dim = getattr(text, "head_dim", None)
    if not dim:
        dim = text.hidden_size // text.num_attention_heads
    return int(dim)


class AttentionError(ValueError):
    """The model cannot run MX attention matmuls."""


def _switch(model: nn.Module) -> str | None:
    """Set ``model``'s attention to ``mx_eager``; returns the implementation it had. A clear error if its
    attention cannot be routed."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise AttentionError(f"attn_bmm: {type(model).__name__} is not a transformers model")
    if any(hasattr(m, "sinks") for m in model.modules()):
        raise AttentionError(f"attn_bmm: {type(model).__name__} uses attention sinks, which mx_eager does not model")
    unsupported = AttentionError(
        f"attn_bmm: {type(model).__name__} does not dispatch attention through transformers' "
        "AttentionInterface, so its attention matmuls cannot be run in MX. Models that do include "
        "Llama, Qwen2, Phi, Phi-3, Mixtral and GPT-2; use attn_bmm=False for this one."
    )
    can_set = getattr(model, "_can_set_attn_implementation", None)
    if callable(can_set) and not can_set():  # transformers would only warn and carry on
        raise unsupported
    _register()
    original = getattr(config, "_attn_implementation", None)
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, NotImplementedError) as e:
        raise unsupported from e
    if config._attn_implementation != NAME:
        raise unsupported
    return original


def enable(model: nn.Module, spec: MXSpec) -> None:
    """Switch ``model`` to MX attention matmuls; a clear error if its attention cannot be routed."""
    original = _switch(model)
    _STATES[id(model.config)] = _State(spec, True, original if original != NAME else "sdpa")


def check(model: nn.Module) -> None:
    """:func:`enable`'s checks, leaving the model as it was (to refuse a configuration before any evaluation)."""
    original = _switch(model)
    model.set_attn_implementation(original if original and original != NAME else "sdpa")  # type: ignore[operator]


def disable(model: nn.Module) -> bool:
    """Restore the model's original attention implementation; False if MX attention was not on."""
    config = getattr(model, "config", None)
    state = _STATES.pop(id(config), None) if config is not None else None
    if state is None:
        return False
    model.set_attn_implementation(state.original or "sdpa")  # type: ignore[operator]
    return True


@contextlib.contextmanager
def bmm_enabled(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Temporarily switch the MX attention matmuls of ``model`` on or off (no-op without them)."""
    state = _STATES.get(id(getattr(model, "config", None)))
    if state is None:
        yield
        return
    before = state.enabled
    state.enabled = enabled
    try:
        yield
    finally:
        state.enabled = before

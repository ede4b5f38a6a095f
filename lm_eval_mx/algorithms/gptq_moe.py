"""GPTQ beyond plain linear layers: the experts of fused 3-D MoE layers (transformers 5) and ``lm_head``.

Fused experts (``gate_up_proj`` or ``up_proj``, and ``down_proj``: [experts, out, in], or [experts, in, out]
when ``is_transposed``) are rounded one expert at a time, each expert's weight a :class:`ExpertView`, the
2-D view of its slice that :func:`lm_eval_mx.algorithms.gptq.gptq_layers` takes as a layer:

1. Routing: the experts module's forward receives ``(hidden_states, top_k_index, top_k_weights)`` from the
   model's own router, run on the block's inputs with the layers before it already quantized. The tokens of
   expert ``e`` are the rows of ``hidden_states`` whose ``top_k_index`` holds ``e`` (in token order, as
   transformers' eager loop gathers them).
2. ``gate_up_proj`` (``up_proj``) of expert ``e``: its Hessian is ``2/n · Σ xᵀx`` over those tokens only
   (unweighted by the routing weight, as GPTQ weighs every calibration token alike).
3. True-sequential inside each expert: once every expert's ``gate_up_proj`` is rounded and written back
   (fake-quantized), ``down_proj`` of expert ``e`` gets the Hessian of its own input, the gated
   intermediate of its tokens computed from the quantized ``gate_up_proj`` (:func:`expert_intermediate`: the
   projection, its bias, then the module's ``_apply_gate``, or ``act_fn`` without a gate, as
   :class:`~lm_eval_mx.nn.layers.MXExperts` runs it).
4. Fallback: an expert that received fewer than ``min_tokens`` tokens (default: as many as the weight has
   inputs, below which its Hessian cannot have full rank and GPTQ would fit those few tokens) is rounded to
   nearest (:func:`~lm_eval_mx.algorithms.gptq.rtn_fallback`): the result records the token count and why.

``lm_head``: its Hessian is taken from its own inputs, the final hidden states (after the model's final norm)
of the model whose blocks are all quantized by then; the forward stops at ``lm_head`` (no logits computed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..numerics.formats import Scheme
from ..numerics.rotation import Rotation
from .gptq import GPTQLayer, GPTQOptions, GPTQResult, gptq_layers

EXPERT_FIRST = ("gate_up_proj", "up_proj")  # the first projection's name, with and without a gate
EXPERT_SECOND = ("down_proj",)


class _Stop(Exception):
    """Ends a forward at the layer whose inputs were wanted."""


def _routing(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    names = ("hidden_states", "top_k_index")
    values = [args[i] if len(args) > i else kwargs[n] for i, n in enumerate(names)]
    return values[0], values[1]


def expert_intermediate(module: nn.Module, x: torch.Tensor, expert: int) -> torch.Tensor:
    """The input of ``down_proj`` of ``expert`` for its tokens ``x``: the first projection (``gate_up_proj`` or
    ``up_proj``, bias included), then the module's gate (``_apply_gate``) or activation."""
    has_gate = getattr(module, "has_gate", True)
    name = "gate_up_proj" if has_gate else "up_proj"
    w = getattr(module, name)[expert]
    h = x @ w if getattr(module, "is_transposed", False) else F.linear(x, w)
    if getattr(module, "has_bias", False):
        h = h + getattr(module, f"{name}_bias")[expert]
    return module._apply_gate(h) if has_gate else module.act_fn(h)  # type: ignore[operator]


class ExpertView:
    """Weight ``name`` of one expert as :class:`~lm_eval_mx.algorithms.gptq.GPTQLayer` needs a layer: ``weight``
    [out, in] (a view of the 3-D parameter, so writes reach it) and forward pre-hooks that receive the expert's
    routed inputs (module docstring, steps 1-3)."""

    def __init__(self, module: nn.Module, name: str, expert: int) -> None:
        self.module, self.name, self.expert = module, name, expert

    @property
    def weight(self) -> torch.Tensor:
        w = getattr(self.module, self.name)[self.expert]
        return w.T if getattr(self.module, "is_transposed", False) else w

    def routed_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
        hidden, index = _routing(args, kwargs)
        tokens = (index == self.expert).any(-1).nonzero().squeeze(-1)
        if tokens.numel() == 0:
            return None
        x = hidden.reshape(-1, hidden.shape[-1])[tokens]
        return expert_intermediate(self.module, x, self.expert) if self.name in EXPERT_SECOND else x

    def register_forward_pre_hook(self, hook: Callable[..., Any]) -> Any:
        def pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = self.routed_inputs(args, kwargs)
            if x is not None:
                hook(module, (x,))

        return self.module.register_forward_pre_hook(pre, with_kwargs=True)


def expert_names(module: nn.Module) -> tuple[list[str], list[str]]:
    """(first projections, second projections) that ``module`` holds, in true-sequential order."""
    held = [n for n in (*EXPERT_FIRST, *EXPERT_SECOND) if isinstance(getattr(module, n, None), torch.Tensor)]
    return [n for n in held if n in EXPERT_FIRST], [n for n in held if n in EXPERT_SECOND]


def expert_layers(name: str, module: nn.Module, names: list[str], scheme: Scheme, rotation: Rotation | None,
                  min_tokens: int | None) -> list[GPTQLayer]:
    """One :class:`GPTQLayer` per expert for each weight of ``names``, named ``{name}.{weight}.{expert}``;
    ``min_tokens`` None: the weight's input count (module docstring, step 4)."""
    out = []
    for w_name in names:
        for e in range(getattr(module, w_name).shape[0]):
            view = ExpertView(module, w_name, e)
            need = view.weight.shape[1] if min_tokens is None else min_tokens
            out.append(GPTQLayer(f"{name}.{w_name}.{e}", view, scheme, rotation, need))  # type: ignore[arg-type]
    return out


def gptq_head(model: nn.Module, layer: GPTQLayer, batches: list[torch.Tensor], options: GPTQOptions,
              set_weight: Callable[[GPTQLayer, GPTQResult], None]) -> GPTQResult:
    """GPTQ of ``lm_head`` on the final hidden states of ``model`` (whose blocks are quantized by now), one
    forward per batch of token ids, stopped at ``lm_head``."""

    done = []

    def halt(*_: Any) -> None:
        raise _Stop

    def finish(lay: GPTQLayer, result: GPTQResult) -> None:
        set_weight(lay, result)
        done.append(lay.name)

    def run(_i: int, m: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        if done:  # gptq_layers passes the items on after the last group: no block follows, nothing to run
            return ids
        stop = layer.module.register_forward_pre_hook(halt)  # after gptq_layers' hook: it has the inputs
        try:
            with contextlib.suppress(_Stop):
                m(ids, use_cache=False)
        finally:
            stop.remove()
        return ids

    results = gptq_layers([model], run, lambda _i, _m: [[layer]], batches, options, finish)
    return results[layer.name]

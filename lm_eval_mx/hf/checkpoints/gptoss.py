"""gpt-oss MXFP4 checkpoints (``quant_method: mxfp4``, as OpenAI ships gpt-oss-20b/120b).

What gpt-oss stores and what transformers 5 computes from it (``Mxfp4HfQuantizer`` / ``GptOssExperts``):

1. only the MoE experts are quantized: per layer ``mlp.experts.gate_up_proj_blocks`` uint8 [E, 2I, H/32, 16] with
   ``gate_up_proj_scales`` uint8 [E, 2I, H/32], and ``down_proj_blocks`` [E, H, I/32, 16] with ``down_proj_scales``
   [E, H, I/32]: MXFP4 quantized along the input dimension (16 bytes = 32 E2M1 codes, low nibble first, one E8M0
   exponent per 32), :func:`lm_eval_mx.numerics.layouts.decode_gptoss_mxfp4`; ``gate_up_proj_bias`` and
   ``down_proj_bias`` high precision;
2. everything else (attention with biases and sinks, router weight and bias, norms, embeddings, lm_head) is stored
   as is (``modules_to_not_convert``);
3. the experts compute, per routed token of expert e: ``gate_up = x @ W_gu[e] + b_gu[e]`` ([2I]); gate and up are
   interleaved (``gate = gate_up[::2]``, ``up = gate_up[1::2]``); ``gate = min(gate, limit)``,
   ``up = clamp(up, -limit, limit)``, ``h = (up + 1) · gate · sigmoid(alpha · gate)`` (limit 7, alpha 1.702 in
   gpt-oss's config); ``out = h @ W_d[e] + b_d[e]``, weighted by the router's softmax over its top-k logits.

hf-mx holds each expert weight as stored in a packed MX layer (codes and scale bytes, [E, N, K/2], no bf16 copy) and
runs transformers' own experts module's gate function, biases and routing (:class:`MXPackedExperts`). Default:
weights only, the checkpoint's statement (and what Hopper kernels compute); ``a_format=...`` quantizes the experts'
inputs (both projections), e.g. MXFP8 as Blackwell's MXFP4 x MXFP8 MoE kernels do.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any

from torch import nn

from ...numerics.layouts import LAYOUTS
from .base import NO_ACTIVATION, LayerRecipe, Shipped, unsupported

QUANT_METHODS = ("mxfp4",)
SUPPORTED = ("gpt-oss MXFP4 experts (quant_method mxfp4: *_blocks/*_scales, weight only by default)",)
_RECIPE = LayerRecipe(LAYOUTS["gptoss-mxfp4"], NO_ACTIVATION, "experts *_blocks/*_scales")


@dataclass(frozen=True)
class GptOss(Shipped):
    not_converted: tuple[str, ...] = ()

    def recipe_for(self, name: str, module: nn.Module) -> LayerRecipe | None:
        experts = type(module).__name__.endswith("GptOssExperts")
        if not experts or any(fnmatch.fnmatchcase(name, p) or name.startswith(f"{p}.") for p in self.not_converted):
            return None
        return _RECIPE

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "ignore": list(self.not_converted), "targets": ["GptOssExperts"]}


def recognise(qc: dict[str, Any]) -> Shipped:
    extra = sorted(set(qc) - {"quant_method", "modules_to_not_convert", "dequantize"})
    if extra:
        raise unsupported(f"mxfp4 quantization_config with keys {extra} (gpt-oss's states quant_method and "
                          "modules_to_not_convert)")
    return GptOss("gpt-oss MXFP4", "mxfp4", (_RECIPE,), qc, tuple(qc.get("modules_to_not_convert") or ()))

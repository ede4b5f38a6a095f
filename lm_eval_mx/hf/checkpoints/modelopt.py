"""NVIDIA ModelOpt NVFP4 exports (``quant_method: modelopt``, ``quant_algo: NVFP4`` or ``W4A16_NVFP4``).

Every ``nn.Linear`` is quantized except those matching ``exclude_modules`` (fnmatch globs, as vLLM applies them).
NVFP4 stores a static per-tensor ``input_scale`` (a divisor) beside each weight; W4A16_NVFP4 is weight only.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from typing import Any

from torch import nn

from ...numerics.formats import TensorScale
from ...numerics.layouts import LAYOUTS, NVFP4
from .base import NO_ACTIVATION, Activation, LayerRecipe, Shipped, experts_recipe, unsupported

QUANT_METHODS = ("modelopt",)
SUPPORTED = ("ModelOpt quant_algo NVFP4 / W4A16_NVFP4 (quant_method modelopt, hf_quant_config.json)",)


_LINEAR = nn.Linear(1, 1, device="meta")  # what an expert's projection is when ModelOpt matches it


@dataclass(frozen=True)
class ModelOpt(Shipped):
    exclude: tuple[str, ...] = ()

    def recipe_for(self, name: str, module: nn.Module) -> LayerRecipe | None:
        if not isinstance(module, nn.Linear):  # ModelOpt quantizes fused experts per expert (w1/w2/w3), as Linear
            return experts_recipe(name, module, lambda n: self.recipe_for(n, _LINEAR))
        if any(
                p == type(module).__name__ or fnmatch.fnmatchcase(name, p) for p in self.exclude):
            return None
        return self.recipes[0]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "ignore": list(self.exclude), "targets": ["Linear"]}


def recognise(qc: dict[str, Any]) -> Shipped:
    details = qc.get("quantization") or qc  # hf_quant_config.json nests it; config.json does not
    algo = str(details.get("quant_algo") or "")
    if algo not in ("NVFP4", "W4A16_NVFP4"):
        raise unsupported(f"ModelOpt checkpoint with quant_algo {algo or 'missing'!r}")
    if int(details.get("group_size", 16)) != 16:
        raise unsupported(f"ModelOpt NVFP4 with group_size {details.get('group_size')} (NVFP4 stores 16)")
    if details.get("kv_cache_quant_algo") or qc.get("kv_cache_scheme"):
        raise unsupported("ModelOpt checkpoint with a quantized KV cache")
    exclude = details.get("exclude_modules", qc.get("ignore")) or ()
    act = (Activation("static", dataclasses.replace(NVFP4, tensor_scale=TensorScale.STATIC), "input_scale")
           if algo == "NVFP4" else NO_ACTIVATION)
    return ModelOpt(f"ModelOpt {algo}", "modelopt", (LayerRecipe(LAYOUTS["modelopt-nvfp4"], act),), qc, tuple(exclude))

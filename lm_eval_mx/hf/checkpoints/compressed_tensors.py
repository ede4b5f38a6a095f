"""compressed-tensors checkpoints (llm-compressor's ``nvfp4-pack-quantized``, ``mxfp4-pack-quantized`` and
``mxfp8-quantized``).

Each config group states a weight layout and an activation recipe for its ``targets`` (module names, ``re:``
patterns or class names, as compressed-tensors matches them), minus the global ``ignore`` list. Groups with
different recipes may stand in one checkpoint (a mixed recipe): each layer takes its own group's.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...numerics.formats import NAMED_SCHEMES, E4M3Steps, TensorScale
from ...numerics.layouts import CT_MXFP4, LAYOUTS, NVFP4, Layout
from ...numerics.packing import MXPacked
from .base import NO_ACTIVATION, Activation, LayerRecipe, Shipped, experts_recipe, layout_to_packed, unsupported

QUANT_METHODS = ("compressed-tensors",)
SUPPORTED = (
    "compressed-tensors format nvfp4-pack-quantized (llm-compressor NVFP4, NVFP4A16)",
    "compressed-tensors format mxfp4-pack-quantized (llm-compressor MXFP4, MXFP4A16)",
    "compressed-tensors format mxfp8-quantized (llm-compressor MXFP8, MXFP8A16)",
)
_NVFP4_ARGS = dict(num_bits=4, type="float", strategy="tensor_group", group_size=16, symmetric=True)
_MXFP4_ARGS = dict(num_bits=4, type="float", strategy="group", group_size=32, symmetric=True)
_MXFP8_ARGS = dict(num_bits=8, type="float", strategy="group", group_size=32, symmetric=True)
_FORMATS = {"nvfp4-pack-quantized": ("ct-nvfp4", _NVFP4_ARGS), "mxfp4-pack-quantized": ("ct-mxfp4", _MXFP4_ARGS),
            "mxfp8-quantized": ("ct-mxfp8", _MXFP8_ARGS)}
_NAMES = {layout: fmt for fmt, (layout, _) in _FORMATS.items()}


def _nvfp4_to_packed(layout: Layout, tensors: Mapping[str, torch.Tensor]) -> tuple[MXPacked, str]:
    """compressed-tensors NVFP4 as :class:`MXPacked`, bit-exact against the library's decoding: with a float32
    ``ts`` where ``ts·s8 == s8/gs`` for every stored scale, else with ``gs`` kept as a divisor."""
    try:
        return layout.to_packed_dict(tensors, exact=True), "ts*s8"
    except ValueError as e:
        if "no float32 ts" not in str(e):
            raise
    p = layout.to_packed_dict(tensors, exact=False)
    gs = tensors["weight_global_scale"].reshape(p.tensor_scale.shape)  # one, or one per expert
    return dataclasses.replace(p, tensor_scale=gs, tensor_scale_divides=True), "s8/gs"


def _group(name: str, group: dict[str, Any], fmt: str) -> LayerRecipe:
    w, a = group.get("weights") or {}, group.get("input_activations")
    fmt = group.get("format") or fmt
    if fmt not in _FORMATS:
        raise unsupported(f"compressed-tensors config group {name} has format {fmt!r}")
    layout_name, want = _FORMATS[fmt]
    if group.get("output_activations"):
        raise unsupported(f"compressed-tensors config group {name} quantizes output activations")
    bad = {k: w.get(k) for k, v in want.items() if w.get(k) != v}
    if bad or w.get("dynamic") not in (False, None):
        raise unsupported(f"compressed-tensors config group {name} ({fmt}) has weights {bad or w} where the format "
                          f"stores {want}")
    layout = LAYOUTS[layout_name]
    source = f"config_groups.{name}"
    convert = _nvfp4_to_packed if layout_name == "ct-nvfp4" else layout_to_packed
    if not a:
        return LayerRecipe(layout, NO_ACTIVATION, source, convert)
    a_want = {k: v for k, v in want.items() if k != "symmetric"}
    bad = {k: a.get(k) for k, v in a_want.items() if a.get(k) != v}
    if bad:
        raise unsupported(f"compressed-tensors config group {name} quantizes input activations with {bad}, not as "
                          f"{fmt}'s activations {a_want}")
    dynamic = str(a.get("dynamic")).lower()
    if layout_name == "ct-nvfp4" and dynamic == "local":  # static input_global_scale, local block scales
        act = Activation("static", dataclasses.replace(NVFP4, tensor_scale=TensorScale.STATIC,
                                                       e4m3_steps=E4M3Steps.DIVIDE), "input_global_scale",
                         reciprocal=True)  # compressed-tensors' own steps, the stored multiplier as stored
    elif dynamic == "true" and layout_name == "ct-mxfp8":  # scales rounded at E2M1's mantissa: runtimes.ct_mx
        act = Activation("dynamic", NAMED_SCHEMES["mxfp8"], rule="compressed-tensors-mx")
    elif dynamic == "true":
        act = Activation("dynamic", NVFP4 if layout_name == "ct-nvfp4" else CT_MXFP4)
    else:
        raise unsupported(f"compressed-tensors config group {name}: input activations with "
                          f"dynamic={a.get('dynamic')!r}")
    return LayerRecipe(layout, act, source, convert)


def _matches(patterns: tuple[str, ...], name: str, module: nn.Module) -> bool:
    """compressed-tensors' target matching: a module name, a ``re:`` pattern (``re.match``) or a class name."""
    for p in patterns:
        if p.startswith("re:"):
            if re.match(p[3:], name):
                return True
        elif p in (name, type(module).__name__):
            return True
    return False


_LINEAR = nn.Linear(1, 1, device="meta")  # what an expert's projection is when llm-compressor matches it


@dataclass(frozen=True)
class CompressedTensors(Shipped):
    groups: tuple[tuple[tuple[str, ...], LayerRecipe], ...] = ()  # (targets, recipe) per config group
    ignore: tuple[str, ...] = ()

    def recipe_for(self, name: str, module: nn.Module) -> LayerRecipe | None:
        if not isinstance(module, nn.Linear):  # llm-compressor quantizes fused experts per expert, as nn.Linear
            return experts_recipe(name, module, lambda n: self.recipe_for(n, _LINEAR))
        if _matches(self.ignore, name, module):
            return None
        found = {r for targets, r in self.groups if _matches(targets, name, module)}
        if len(found) > 1:
            raise unsupported(f"compressed-tensors: {name} is targeted by config groups with different recipes "
                              f"({', '.join(sorted(r.source for r in found))})")
        return found.pop() if found else None

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "ignore": list(self.ignore),
                "targets": [t for targets, _ in self.groups for t in targets]}


def recognise(qc: dict[str, Any]) -> Shipped:
    status = qc.get("quantization_status")
    if status != "compressed":
        raise unsupported(f"compressed-tensors checkpoint with quantization_status {status!r} (its weights are not "
                          "stored packed; only 'compressed' checkpoints are read as stored)")
    groups = qc.get("config_groups") or {}
    if not groups:
        raise unsupported("compressed-tensors config without config_groups")
    recipes = {n: _group(n, g, qc.get("format") or "") for n, g in groups.items()}
    if qc.get("kv_cache_scheme"):
        raise unsupported("compressed-tensors config with a kv_cache_scheme")
    if (qc.get("transform_config") or {}).get("config_groups"):
        raise unsupported("compressed-tensors config with transforms (rotated weights)")
    distinct = tuple(dict.fromkeys(dataclasses.replace(r, source="") for r in recipes.values()))
    if len(distinct) == 1:  # one recipe: the per-layer record needs no group name
        recipes = dict.fromkeys(recipes, distinct[0])
    name = f"compressed-tensors {_NAMES[distinct[0].layout.name]}" if len(distinct) == 1 else \
        "compressed-tensors mixed recipe"
    return CompressedTensors(name, "compressed-tensors", tuple(dict.fromkeys(recipes.values())), qc,
                             tuple((tuple(g.get("targets") or ()), recipes[n]) for n, g in groups.items()),
                             tuple(qc.get("ignore") or ()))

"""AMD Quark HF exports (``quant_method: quark``, amd-quark's ``export_safetensors``, ``real_quantized``).

Each ``nn.Linear`` (and each expert's projection of fused experts: Quark's ``preprocess_for_quantization`` splits
transformers 5's fused experts into per-expert ``nn.Linear`` before quantizing and stores them per expert) gets its :class:`~.base.LayerRecipe` as Quark's runtime picks its config
(``quark/torch/export/main_export/quant_config_parser.py``, ``get_layer_quant_config``, amd-quark 0.13): the first
``layer_quant_config`` glob (fnmatch, in the config's order) matching the layer's name, else
``layer_type_quant_config["Linear"]``, else ``global_quant_config``; a layer matching an ``exclude`` glob is stored
as is whatever its config. Supported per-layer specs (anything else is refused, naming these):

* weights: MXFP4, MXFP6 E2M3 / E3M2 (per_group 32, ``scale_format: e8m0``), NVFP4 (fp4 per_group 16 float32 scales
  with an fp8_e4m3 per-tensor second stage: ``weight_scale_2``);
* inputs: none; dynamic MX of the same element formats (scales by ``scale_calculation_mode`` even, floor or ceil:
  ``scale_mode`` even, log2, log2_ceil);
  static fp8_e4m3 per-tensor (``input_scale``, a divisor); NVFP4 dynamic blocks under a static per-tensor second
  stage (``input_scale_2``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...numerics.formats import FORMATS, E4M3Steps, ScaleFormat, ScaleMode, Scheme, TensorScale
from ...numerics.layouts import CT_MXFP4, LAYOUTS, NVFP4, Layout
from ...numerics.packing import MXPacked
from .base import NO_ACTIVATION, Activation, LayerRecipe, Shipped, experts_recipe, layout_to_packed, unsupported

QUANT_METHODS = ("quark",)
SUPPORTED = ("AMD Quark real_quantized exports (quant_method quark): per layer MXFP4, MXFP6 E2M3/E3M2 or NVFP4 "
             "weights with no, dynamic MX, static FP8 per-tensor (input_scale) or NVFP4 (input_scale_2) input "
             "quantization; global_quant_config, layer_quant_config / layer_type_quant_config globs, exclude",)

_MX_LAYOUT = {"fp4": "quark-mxfp4", "fp6_e2m3": "quark-mxfp6-e2m3", "fp6_e3m2": "quark-mxfp6-e3m2"}
_ELEM = {"fp4": "fp4_e2m1", "fp6_e2m3": "fp6_e2m3", "fp6_e3m2": "fp6_e3m2"}
# Quark's floor/ceil take torch.log2 of the block maximum in float32 (fake_quantize_mx), not its exponent bits:
# this project's log2 / log2_ceil rules, not floor / ceil (they differ a few ulps from a power of two).
_MODES = {None: ScaleMode.EVEN, "even": ScaleMode.EVEN, "floor": ScaleMode.LOG2, "ceil": ScaleMode.LOG2_CEIL}
# Quark's FP8 per-tensor input: x / input_scale, clamped to ±448, cast to E4M3, times input_scale.
FP8_PER_TENSOR: Scheme = Scheme(FORMATS["fp8_e4m3"], 0, ScaleFormat.NONE, TensorScale.STATIC)
# Quark's NVFP4 inputs: block scales relative to the stored input_scale_2, elements divided by e4m3 · input_scale_2.
NVFP4_STATIC: Scheme = dataclasses.replace(NVFP4, tensor_scale=TensorScale.STATIC, e4m3_steps=E4M3Steps.QUARK)


_LINEAR = nn.Linear(1, 1, device="meta")  # what an expert's projection is when Quark matches it


def _convert(layout: Layout, tensors: Mapping[str, torch.Tensor]) -> tuple[MXPacked, str]:
    """The layout's conversion, the packed weight recording the scale rule the config states."""
    packed, how = layout_to_packed(layout, tensors)
    return dataclasses.replace(packed, scheme=layout.scheme), how


def _is(spec: Any, **want: Any) -> bool:
    return isinstance(spec, dict) and all(spec.get(k) == v for k, v in want.items())


def _mode(where: str, spec: dict[str, Any]) -> ScaleMode:
    mode = spec.get("scale_calculation_mode")
    if mode not in _MODES:
        raise unsupported(f"Quark {where}: scale_calculation_mode {mode!r} (supported: even, floor, ceil)")
    return _MODES[mode]


def _mx(spec: Any, dynamic: bool) -> bool:
    return _is(spec, qscheme="per_group", group_size=32, scale_format="e8m0", is_dynamic=dynamic) and \
        spec.get("dtype") in _MX_LAYOUT and spec.get("ch_axis") in (-1, 1, None)


def _nvfp4(spec: Any, dynamic: bool) -> bool:
    return isinstance(spec, list) and len(spec) == 2 and \
        _is(spec[0], dtype="fp4", qscheme="per_group", group_size=16, scale_format="float32", is_dynamic=dynamic) and \
        _is(spec[1], dtype="fp8_e4m3", qscheme="per_tensor", is_dynamic=False, is_scale_quant=True)


def _weight(where: str, spec: Any) -> Layout:
    if _mx(spec, False):
        lay = LAYOUTS[_MX_LAYOUT[spec["dtype"]]]
        return dataclasses.replace(lay, scheme=dataclasses.replace(lay.scheme, scale_mode=_mode(where, spec)))
    if _nvfp4(spec, False):
        return LAYOUTS["quark-nvfp4"]
    raise unsupported(f"Quark {where}: weight spec {_short(spec)}")


def _input(where: str, spec: Any) -> Activation:
    if spec is None:
        return NO_ACTIVATION
    if _mx(spec, True):
        scheme = dataclasses.replace(CT_MXFP4, elem=FORMATS[_ELEM[spec["dtype"]]], scale_mode=_mode(where, spec))
        return Activation("dynamic", scheme)
    if _is(spec, dtype="fp8_e4m3", qscheme="per_tensor", is_dynamic=False):
        return Activation("static", FP8_PER_TENSOR, "input_scale")
    if _nvfp4(spec, True):
        return Activation("static", NVFP4_STATIC, "input_scale_2")
    raise unsupported(f"Quark {where}: input_tensors spec {_short(spec)}")


def _short(spec: Any) -> str:
    keys = ("dtype", "qscheme", "group_size", "scale_format", "is_dynamic", "is_scale_quant")
    if isinstance(spec, list):
        return "[" + ", ".join(_short(s) for s in spec) + "]"
    return str({k: spec.get(k) for k in keys}) if isinstance(spec, dict) else repr(spec)


def _recipe(where: str, cfg: Any) -> LayerRecipe | None:
    """A layer config (global / per-type / per-glob) as a recipe; None when it quantizes nothing."""
    if not isinstance(cfg, dict):
        raise unsupported(f"Quark {where}: not a layer config ({type(cfg).__name__})")
    for key in ("bias", "output_tensors"):
        if cfg.get(key) is not None:
            raise unsupported(f"Quark {where}: quantizes {key} (only weights and inputs are supported)")
    if cfg.get("weight") is None:
        if cfg.get("input_tensors") is not None:
            raise unsupported(f"Quark {where}: quantizes inputs of layers with unquantized weights")
        return None
    return LayerRecipe(_weight(where, cfg["weight"]), _input(where, cfg.get("input_tensors")), where, _convert)


@dataclass(frozen=True)
class Quark(Shipped):
    by_glob: tuple[tuple[str, LayerRecipe | None], ...] = ()
    by_type: tuple[tuple[str, LayerRecipe | None], ...] = ()
    default: LayerRecipe | None = None
    exclude: tuple[str, ...] = ()

    def recipe_for(self, name: str, module: nn.Module) -> LayerRecipe | None:
        if not isinstance(module, nn.Linear):  # Quark quantizes fused experts per expert, as Linear (QuarkExperts)
            return experts_recipe(name, module, lambda n: self.recipe_for(n, _LINEAR))
        if any(fnmatch.fnmatchcase(name, p) for p in self.exclude):
            return None
        for pattern, recipe in self.by_glob:
            if fnmatch.fnmatchcase(name, pattern):
                return recipe
        types = dict(self.by_type)
        return types.get(type(module).__name__, self.default)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "exclude": list(self.exclude),
                "layer_quant_config": [p for p, _ in self.by_glob], "layer_type_quant_config": [t for t, _ in
                                                                                               self.by_type]}


def recognise(qc: dict[str, Any]) -> Shipped:
    export = qc.get("export") or {}
    if export.get("weight_format", "real_quantized") != "real_quantized":
        raise unsupported(f"Quark export with weight_format {export.get('weight_format')!r} (only real_quantized "
                          "stores the quantized codes)")
    for key in ("kv_cache_quant_config", "softmax_quant_spec"):
        if qc.get(key):
            raise unsupported(f"Quark config with {key} (quantized KV cache / attention)")
    algos = [a.get("name", "") if isinstance(a, dict) else str(a) for a in qc.get("algo_config") or []]
    if any("rotation" in str(a).lower() or "quarot" in str(a).lower() for a in algos):
        raise unsupported(f"Quark config with rotations {algos} (rotated weights)")
    by_glob = tuple((str(p), _recipe(f"layer_quant_config[{p!r}]", c))
                    for p, c in (qc.get("layer_quant_config") or {}).items())
    by_type = tuple((str(t), _recipe(f"layer_type_quant_config[{t!r}]", c))
                    for t, c in (qc.get("layer_type_quant_config") or {}).items())
    default = _recipe("global_quant_config", qc.get("global_quant_config")) \
        if qc.get("global_quant_config") is not None else None
    recipes = tuple(dict.fromkeys(r for r in (default, *(r for _, r in by_type), *(r for _, r in by_glob))
                                  if r is not None))
    if not recipes:
        raise unsupported("Quark config that quantizes no layer")
    names = sorted({r.layout.library + ("" if r.activation.kind == "none" else f" + {r.activation.scheme.name} "
                                        "inputs") for r in recipes})
    return Quark(f"AMD Quark ({'; '.join(names)})", "quark", recipes, qc, by_glob, by_type, default,
                 tuple(qc.get("exclude") or ()))

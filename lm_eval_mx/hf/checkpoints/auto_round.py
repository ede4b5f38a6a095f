"""auto-round's own format (``quant_method: auto-round``, ``packing_format: auto_round:llm_compressor``): MXFP4,
MXFP8 and NVFP4 in compressed-tensors' tensor names, evaluated as auto-round's runtime computes them.

What auto-round 0.16.1 does with such a checkpoint (``auto_round/inference/convert_model.py: get_layer_config``,
``inference/backend.py``, ``experimental/qmodules/mx.py`` and ``nvfp4.py``), and so what this reader does:

* the quantized layers are the ``nn.Linear`` modules under a ``block_name_to_quantize`` (or ``quant_block_list``)
  prefix, minus ``extra_config`` entries of 16 bits or more; any other per-layer override is refused;
* weights: ``data_type`` ``mx_fp`` with ``bits`` 4 (``weight_packed``/``weight_scale``: ``ar-mxfp4``, compressed-tensors'
  ``ct-mxfp4`` bytes) or 8 (``weight``/``weight_scale``: ``ct-mxfp8``), group 32; ``nv_fp`` with bits 4, group 16
  (``ar-nvfp4``: compressed-tensors' NVFP4 tensors, auto-round's decoding order);
* activations: ``act_bits`` 16 (or none) is weight only; ``act_data_type`` ``mx_fp`` (dynamic, group 32, the
  weights' element format) by auto-round's own MX rule (:func:`lm_eval_mx.numerics.runtimes.autoround_mx`);
  ``nv_fp4_with_static_gs`` with the stored ``input_global_scale`` by its NVFP4 rule
  (:func:`~lm_eval_mx.numerics.runtimes.autoround_nvfp4`).

Other auto-round checkpoints (int weights: ``auto_round:auto_gptq``, ``auto_round:auto_awq``, ``auto_round``
packing; other data types) are refused with the reason.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from ...numerics.formats import NAMED_SCHEMES, ScaleMode, TensorScale
from ...numerics.layouts import LAYOUTS, NVFP4
from .base import NO_ACTIVATION, Activation, LayerRecipe, Shipped, unsupported

QUANT_METHODS = ("auto-round",)
SUPPORTED = ("auto-round packing_format auto_round:llm_compressor (data_type mx_fp 4/8 bits: MXFP4, MXFP8; nv_fp: "
             "NVFP4), with auto-round's own activation arithmetic",)
_PACKING = "auto_round:llm_compressor"
# (data_type, bits, group_size) -> (layout, activation element scheme name)
_WEIGHTS = {("mx_fp", 4, 32): ("ar-mxfp4", "mxfp4"), ("mx_fp", 8, 32): ("ct-mxfp8", "mxfp8"),
            ("nv_fp", 4, 16): ("ar-nvfp4", "nvfp4")}


def _refuse(what: str) -> Exception:
    return unsupported(f"auto-round checkpoint {what}")


def _recipe(qc: dict[str, Any]) -> LayerRecipe:
    data_type, bits, group = qc.get("data_type", "int"), qc.get("bits"), qc.get("group_size")
    packing = qc.get("packing_format") or "auto_round"
    if packing != _PACKING or (data_type, bits, group) not in _WEIGHTS:
        raise _refuse(f"with data_type {data_type!r}, bits {bits}, group_size {group}, packing_format {packing!r}: "
                      f"hf-mx reads auto-round's MX/NVFP4 formats (data_type mx_fp bits 4 or 8 group 32, nv_fp bits 4 "
                      f"group 16; packing_format {_PACKING}); integer weights (W4A16 and the like) hold no MX "
                      "block scales: evaluate them with lm-eval's hf model")
    if qc.get("sym") is False:
        raise _refuse("with sym false (MX/NVFP4 are symmetric)")
    layout_name, a_name = _WEIGHTS[(data_type, bits, group)]
    layout = LAYOUTS[layout_name]
    act_bits, act_type = qc.get("act_bits"), qc.get("act_data_type")
    if act_bits is None or int(act_bits) >= 16:
        return LayerRecipe(layout, NO_ACTIVATION, "quantization_config")
    got = (act_type, int(act_bits), qc.get("act_group_size"), bool(qc.get("act_sym", True)))
    if data_type == "mx_fp" and got == ("mx_fp", bits, 32, True) and qc.get("act_dynamic", True):
        # the scheme says what the rule computes (scale_mode=log2); the rule is auto-round's runtime to the letter
        act = Activation("dynamic", dataclasses.replace(NAMED_SCHEMES[a_name], scale_mode=ScaleMode.LOG2),
                         rule="auto-round-mx")
    elif data_type == "nv_fp" and got == ("nv_fp4_with_static_gs", 4, 16, True):
        act = Activation("static", dataclasses.replace(NVFP4, tensor_scale=TensorScale.STATIC), "input_global_scale",
                         rule="auto-round-nvfp4")
    else:
        raise _refuse(f"quantizing activations with act_data_type {act_type!r}, act_bits {act_bits}, act_group_size "
                      f"{qc.get('act_group_size')}, act_sym {qc.get('act_sym')}: hf-mx reproduces auto-round's mx_fp "
                      "(dynamic, the weights' bits, group 32) and nv_fp4_with_static_gs (group 16) activations")
    return LayerRecipe(layout, act, "quantization_config")


def _blocks(qc: dict[str, Any]) -> tuple[str, ...]:
    names = qc.get("quant_block_list") or qc.get("block_name_to_quantize") or qc.get("to_quant_block_names")
    if isinstance(names, str):
        names = names.split(",")
    flat: list[str] = []
    for n in names or ():
        flat.extend(n if isinstance(n, (list, tuple)) else [n])
    if not flat:
        raise _refuse("without block_name_to_quantize: which layers it quantized is not stated")
    return tuple(str(n).strip() for n in flat if str(n).strip())


def _skipped(qc: dict[str, Any]) -> tuple[str, ...]:
    """``extra_config`` keys kept in high precision (bits >= 16); any other override is refused."""
    out = []
    for key, cfg in (qc.get("extra_config") or {}).items():
        if int((cfg or {}).get("bits", 16)) < 16:
            raise _refuse(f"with a per-layer override extra_config[{key!r}] = {cfg}: mixed auto-round recipes are "
                          "not read yet")
        out.append(key)
    return tuple(out)


@dataclass(frozen=True)
class AutoRound(Shipped):
    blocks: tuple[str, ...] = ()
    high_precision: tuple[str, ...] = ()

    def recipe_for(self, name: str, module: nn.Module) -> LayerRecipe | None:
        if type(module) is not nn.Linear or not any(name == b or name.startswith(b + ".") for b in self.blocks):
            return None
        if any(name == k or re.search(k, name) for k in self.high_precision):
            return None
        return self.recipes[0]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "targets": [f"nn.Linear under {b}" for b in self.blocks],
                "ignore": list(self.high_precision)}


def recognise(qc: dict[str, Any]) -> Shipped:
    recipe = _recipe(qc)
    fmt = {"ar-mxfp4": "MXFP4", "ct-mxfp8": "MXFP8", "ar-nvfp4": "NVFP4"}[recipe.layout.name]
    a16 = "A16" if recipe.activation.kind == "none" else ""
    return AutoRound(f"auto-round {fmt}{a16} ({_PACKING})", "auto-round", (recipe,), qc, _blocks(qc), _skipped(qc))

"""``--save_format compressed-tensors``: a quantized model's codes as the checkpoint llm-compressor writes
(``nvfp4-pack-quantized`` / ``mxfp4-pack-quantized``), so that transformers (with compressed-tensors) and vLLM
load what was evaluated.

What can be written exactly (:func:`check_layers` refuses the rest, before any rounding, naming the layer):

* weights: MXFP4 (``fp4_e2m1``, blocks of 32, E8M0 scales; any scale mode or rounding: the codes and scale bytes
  are stored as they are, and compressed-tensors decodes ``code · 2**(s - 127)`` exactly); NVFP4 (``fp4_e2m1``,
  blocks of 16, E4M3 scales, per-tensor scale from the maximum). No rotation: rotated weights need
  compressed-tensors' transform config, which is not written. No NaN block (compressed-tensors has no NaN scale).
* NVFP4's per-tensor scale: this project dequantizes ``value · (ts · s8)``, compressed-tensors ``value · (s8 / gs)``.
  A float32 ``gs`` with ``s8 / gs == ts · s8`` (float32) for every block scale the weight uses is searched among
  ``1/ts`` and its float32 neighbours (:func:`exact_global_scale`). Where none exists (most weights: the two
  products round differently for some of the block scales present) ``gs = fl(1/ts)`` is written and the layer is
  recorded in the report's ``export.deviations`` with the number of blocks whose effective scale differs in its
  last float32 bit: the codes and the E4M3 scale bytes are GPTQ's as they are, the decoded values of those blocks
  differ from this project's by at most one float32 rounding of the scale.
* activations: none (``...A16`` config), or MXFP4 exactly as compressed-tensors quantizes them at run time
  (dynamic, blocks of 32, the block maximum rounded to a power of two: ``scale_mode=even``). NVFP4 activations are
  refused: compressed-tensors' take a static, calibrated global scale (``input_global_scale``); this project's take
  each input's own maximum at run time.

Tensor names: a linear layer ``L`` stores ``L.weight_packed``, ``L.weight_scale`` (and ``L.weight_global_scale``,
float32 [1]); fused experts are stored per expert under the names transformers' own conversion rules give them
when it saves the model (``revert_weight_conversion``: Mixtral's ``block_sparse_moe.experts.N.w1/w3/w2``,
Qwen-MoE's ``mlp.experts.N.gate_proj/up_proj/down_proj``), ``gate_up_proj``'s rows split into gate and up. Every
other tensor is saved as ``save_pretrained`` saves it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..nn.layers import MXPackedLayer, mx_layers
from ..nn.spec import MXSpec
from ..numerics.formats import Rounding, ScaleFormat, ScaleMode, Scheme, TensorScale
from ..numerics.layouts.compressed_tensors import nearby_reciprocal
from ..numerics.packing import MXPacked

FORMATS = {"nvfp4": "nvfp4-pack-quantized", "mxfp4": "mxfp4-pack-quantized"}
_WEIGHTS = {"nvfp4": {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 16, "strategy": "tensor_group",
                      "dynamic": False, "scale_dtype": "torch.float8_e4m3fn"},
            "mxfp4": {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 32, "strategy": "group",
                      "dynamic": False, "scale_dtype": "torch.uint8"}}
_MXFP4_ACT = {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 32, "strategy": "group",
              "dynamic": True, "scale_dtype": "torch.uint8"}


def weight_kind(scheme: Scheme) -> str | None:
    """``mxfp4`` / ``nvfp4`` when compressed-tensors stores ``scheme``'s weights exactly, else None."""
    if scheme.elem.name != "fp4_e2m1":
        return None
    if scheme.is_mx and scheme.block_size == 32 and scheme.scale_bits == 8:
        return "mxfp4"
    if (scheme.scale_format is ScaleFormat.E4M3 and scheme.block_size == 16 and scheme.tensor_scale is TensorScale.AMAX
            and scheme.rounding is Rounding.EVEN):
        return "nvfp4"
    return None


def _activation_ok(a: Scheme) -> bool:
    return (a.elem.name == "fp4_e2m1" and a.is_mx and a.block_size == 32 and a.scale_bits == 8
            and a.scale_mode is ScaleMode.EVEN and a.rounding is Rounding.EVEN)


def check_spec(name: str, spec: MXSpec) -> str:
    """The compressed-tensors format of a layer quantized with ``spec``, or ValueError naming what it cannot hold."""
    kind = weight_kind(spec.w)
    if kind is None:
        raise ValueError(f"--save_format compressed-tensors stores MXFP4 (fp4_e2m1, blocks of 32, E8M0 scales) or NVFP4 "
                         f"weights; {name} has {spec.w.name}: use --save_format mx")
    if spec.rotation is not None:
        raise ValueError(f"--save_format compressed-tensors: {name} is rotated ({spec.rotation.label()}); its weights "
                         "would need compressed-tensors' transform config, which this export does not write: drop "
                         "rotation= or use --save_format mx")
    a = spec.a
    if a is not None and not (kind == "mxfp4" and _activation_ok(a)):
        why = ("compressed-tensors' NVFP4 activations take a static calibrated global scale (input_global_scale), this "
               "project's the maximum of each input at run time" if kind == "nvfp4" else
               "compressed-tensors quantizes MXFP4 activations dynamically in blocks of 32 with the block maximum "
               "rounded to a power of two (scale_mode=even)")
        raise ValueError(f"--save_format compressed-tensors: {name}'s activations ({a.name}) cannot be stored exactly: "
                         f"{why}. Quantize weights only (weight_only=True), or use scale_mode=even for "
                         "MXFP4, or --save_format mx")
    return kind


def check_layers(specs: dict[str, MXSpec]) -> str | None:
    """Refuse a selection compressed-tensors cannot hold (one format and one activation recipe for all layers);
    returns that one format (None for no layer)."""
    kinds = {check_spec(name, spec) for name, spec in specs.items()}
    acts = {spec.a is not None for spec in specs.values()}
    if len(kinds) > 1 or len(acts) > 1:
        raise ValueError("--save_format compressed-tensors writes one recipe for all quantized layers; this selection "
                         f"mixes {', '.join(sorted(kinds))} weights and activations {'on and off' if len(acts) > 1 else ''}"
                         ": use --save_format mx")
    return next(iter(kinds), None)


def exact_global_scale(ts: torch.Tensor, s8: torch.Tensor) -> torch.Tensor | None:
    """A float32 ``gs`` with ``s8 / gs == ts · s8`` for every E4M3 value ``s8`` (float32), or None."""
    ts = ts.to(torch.float32).reshape(())
    s8 = torch.unique(s8[torch.isfinite(s8)])
    gs = nearby_reciprocal(ts, lambda g: torch.equal(s8 / g, ts * s8))
    return None if gs is None else gs.reshape(1)


def ct_tensors(name: str, p: MXPacked, kind: str, deviations: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """``weight_packed``, ``weight_scale`` (and ``weight_global_scale``) of one matrix [N, K] packed as ``p``; an
    NVFP4 matrix without an exact global scale gets ``fl(1/ts)`` and a row in ``deviations``."""
    if p.shape[-1] % (32 if kind == "mxfp4" else 16):
        raise ValueError(f"--save_format compressed-tensors: {name} has {p.shape[-1]} inputs, not a whole number of "
                         "blocks (compressed-tensors pads no block)")
    if kind == "mxfp4":
        if bool((p.scales == 255).any()):
            raise ValueError(f"--save_format compressed-tensors: {name} holds a NaN block (E8M0 scale 255), which "
                             "compressed-tensors decodes as inf")
        return {"weight_packed": p.codes, "weight_scale": p.scales}
    s8 = p.scales.view(torch.float8_e4m3fn).to(torch.float32)
    if not bool(torch.isfinite(s8).all()) or p.tensor_scale is None or p.tensor_scale_divides:
        raise ValueError(f"--save_format compressed-tensors: {name} holds a NaN block or no per-tensor scale")
    ts = p.tensor_scale.to(torch.float32).reshape(())
    gs = exact_global_scale(ts, s8)
    if gs is None:
        gs = (1.0 / ts).reshape(1)
        off = int((s8 / gs != ts * s8).sum())
        deviations.append({"layer": name, "weight_global_scale": "fl(1/ts): no exact float32 gs", "ts": float(ts),
                           "blocks": s8.numel(), "blocks_off_in_last_bit": off})
    return {"weight_packed": p.codes, "weight_scale": p.scales.view(torch.float8_e4m3fn), "weight_global_scale": gs}


def _expert_tensors(model: nn.Module, name: str, module: MXPackedLayer, kind: str, deviations: list[dict[str, Any]]
                    ) -> dict[str, torch.Tensor]:
    """Per-expert tensors under the checkpoint names transformers saves fused experts with."""
    from transformers.core_model_loading import revert_weight_conversion

    if getattr(module, "is_transposed", False):
        raise ValueError(f"--save_format compressed-tensors: {name} stores its experts transposed (gpt-oss layout), "
                         "which compressed-tensors' per-expert Linear names do not describe: use --save_format mx")
    out: dict[str, torch.Tensor] = {}
    for weight in sorted(module.mx_prequantized):
        n_exp = module.mx_shapes[weight][0]
        parts = [ct_tensors(f"{name}.{weight}[{e}]", module.mx_packed(weight, e), kind, deviations)
                 for e in range(n_exp)]
        for leaf in parts[0]:
            stacked = torch.stack([p[leaf] for p in parts])
            if leaf == "weight_global_scale":  # one per expert, repeated on every row so that the split keeps it
                rows = module.mx_shapes[weight][1]
                stacked = stacked.reshape(n_exp, 1, 1).expand(n_exp, rows, 1).contiguous()
            reverted = revert_weight_conversion(model, {f"{name}.{weight}": stacked})
            if len(reverted) == 1 and f"{name}.{weight}" in reverted:
                raise ValueError(f"--save_format compressed-tensors: transformers has no per-expert names for {name} "
                                 f"({type(model).__name__}): use --save_format mx")
            for key, t in reverted.items():
                t = t[:1, 0].contiguous() if leaf == "weight_global_scale" else t.contiguous()
                out[f"{key.removesuffix('.weight')}.{leaf}"] = t
    return out


def ct_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], str, list[str], list[dict[str, Any]]]:
    """(tensors as compressed-tensors stores them, the format, the packed layers' names, the deviations)."""
    from transformers.core_model_loading import revert_weight_conversion

    layers = {n: m for n, m in mx_layers(model) if isinstance(m, MXPackedLayer)}
    if not layers:
        raise ValueError("--save_format compressed-tensors: the model holds no packed layer")
    kind = check_layers({n: m.mx_spec for n, m in layers.items()})
    assert kind is not None  # layers is not empty
    own = {f"{n}.{k}" for n, m in layers.items() for k in m.mx_stored()}
    rest = {k: v for k, v in model.state_dict().items() if k not in own}
    quantized: dict[str, torch.Tensor] = {}
    deviations: list[dict[str, Any]] = []
    for name, module in layers.items():
        if "weight" in module.mx_prequantized:
            quantized.update({f"{name}.{leaf}": t for leaf, t in
                              ct_tensors(name, module.mx_packed("weight"), kind, deviations).items()})
        else:
            quantized.update(_expert_tensors(model, name, module, kind, deviations))
    tensors = revert_weight_conversion(model, rest)
    clash = set(tensors) & set(quantized)
    if clash:
        raise RuntimeError(f"compressed-tensors export: tensor names written twice: {sorted(clash)[:3]}")
    return {**tensors, **quantized}, kind, list(layers), deviations


def ct_config(model: nn.Module, kind: str, quantized: list[str], activations: bool) -> dict[str, Any]:
    """compressed-tensors' ``quantization_config`` (as ``QuantizationConfig.model_dump`` writes it): targets
    ``Linear`` and the fused experts modules by name, every linear layer left unquantized in ``ignore``."""
    modules = dict(model.named_modules())
    experts = [n for n in quantized if not isinstance(modules[n], nn.Linear)]
    ignore = [n for n, m in modules.items() if isinstance(m, nn.Linear) and n not in quantized]
    group = {"targets": ["Linear", *experts], "weights": _WEIGHTS[kind],
             "input_activations": _MXFP4_ACT if activations else None, "output_activations": None, "format": None}
    return {"config_groups": {"group_0": group}, "quant_method": "compressed-tensors", "kv_cache_scheme": None,
            "format": FORMATS[kind], "quantization_status": "compressed", "global_compression_ratio": None,
            "ignore": ignore, "moe_sparsity_config": None}


def save_compressed_tensors(model: nn.Module, tokenizer: Any, origin: dict[str, Any], layers: list[dict[str, Any]],
                            out_dir: str | Path) -> dict[str, Any]:
    """Write the packed ``model`` as a compressed-tensors checkpoint in ``out_dir``: ``model.safetensors``,
    ``config.json`` (with the compressed-tensors ``quantization_config``), the tokenizer, and the per-layer report
    (``mx_quantize.json``, with how the export mapped the scales). Returns the quantization config."""
    from safetensors.torch import save_file

    from .quantize_model import REPORT_FILE

    tensors, kind, quantized, deviations = ct_state_dict(model)
    acts = any(m.mx_spec.a is not None for n, m in mx_layers(model) if n in quantized)
    qc = ct_config(model, kind, quantized, acts)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = copy.deepcopy(model.config)
    config.quantization_config = qc
    config.architectures = config.architectures or [type(model).__name__]
    config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    export = {"save_format": "compressed-tensors", "format": FORMATS[kind],
              "activations": "mxfp4 dynamic, scale_mode=even" if acts else "none (weights only)",
              "exact": not deviations, "deviations": deviations}
    (out / REPORT_FILE).write_text(json.dumps({"origin": origin, "export": export, "layers": layers}, indent=2) + "\n")
    return export

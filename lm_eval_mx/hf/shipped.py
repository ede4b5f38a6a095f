"""Checkpoints quantized by other tools, evaluated with their weights as stored.

:func:`recognise` reads a checkpoint's ``quantization_config`` (config.json, or ModelOpt's
``hf_quant_config.json``) and returns a :class:`Shipped` description of a supported format, None for an
unquantized checkpoint or one of this project's own (``quant_method="mx"``, :mod:`.quantizer`), and raises,
naming what is supported, for anything else. :func:`load_shipped` builds the model on the meta device,
turns every linear layer the checkpoint quantized into a packed MX layer (:func:`lm_eval_mx.nn.layers.convert_packed`),
reads the safetensors files tensor by tensor, converts each quantized layer's stored tensors with
:mod:`lm_eval_mx.numerics.layouts` (codes and scale bytes kept as they are: no high-precision copy) and loads
every other tensor as stored. A tensor that disagrees with the config is an error naming it.

Activations follow the checkpoint's recipe unless model_args override it: a stored per-tensor input scale
gives ``tensor_scale=static`` NVFP4 (block scales computed relative to the stored scale), a dynamic recipe the
format's dynamic scheme, a weight-only (A16) checkpoint no activation quantization.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..nn.layers import MXLinear, MXPackedLayer, convert_packed
from ..nn.spec import MXSpec
from ..numerics.formats import Scheme, TensorScale
from ..numerics.layouts import CT_MXFP4, LAYOUTS, NVFP4, Layout
from ..numerics.packing import MXPacked
from ..selection.report import LayerEntry, MXReport
from ..selection.roles import find_candidates

SUPPORTED = (
    "compressed-tensors format nvfp4-pack-quantized (llm-compressor NVFP4, NVFP4A16)",
    "compressed-tensors format mxfp4-pack-quantized (llm-compressor MXFP4, MXFP4A16)",
    "ModelOpt quant_algo NVFP4 / W4A16_NVFP4 (quant_method modelopt, hf_quant_config.json)",
    "lm-eval-mx's own packed checkpoints (quant_method mx)",
)
NOT_YET = "gpt-oss MXFP4 experts (quant_method mxfp4) are recognised but not supported yet"


class ShippedCheckpointError(ValueError):
    """A checkpoint whose quantization hf-mx cannot evaluate as stored, or whose tensors disagree with it."""


def _unsupported(what: str) -> ShippedCheckpointError:
    return ShippedCheckpointError(
        f"hf-mx: {what}. Supported quantized checkpoints: {'; '.join(SUPPORTED)}. {NOT_YET}. Other quantized "
        f"checkpoints (AWQ, int GPTQ, bitsandbytes, FP8...) are not supported by hf-mx; evaluate them with lm-eval's "
        f"hf model"
    )


@dataclass(frozen=True)
class Shipped:
    """A supported checkpoint format: its layout, the layers it quantized and its activation recipe."""

    name: str  # e.g. "compressed-tensors nvfp4-pack-quantized"
    layout: Layout
    quant_method: str
    activations: str | None  # "static" (stored per-tensor input scale), "dynamic", None (weight only)
    input_scale: str | None  # the stored input scale's tensor name, for activations="static"
    targets: tuple[str, ...]
    ignore: tuple[str, ...]
    matching: str  # "compressed-tensors" (names, re: patterns, class names) or "fnmatch" (ModelOpt)
    config: dict[str, Any] = field(compare=False)

    def quantized(self, name: str, module: nn.Module) -> bool:
        """Whether the checkpoint stores ``name`` (an ``nn.Linear``) quantized."""
        return self._any(self.targets, name, module) and not self._any(self.ignore, name, module)

    def _any(self, patterns: tuple[str, ...], name: str, module: nn.Module) -> bool:
        for p in patterns:
            if self.matching == "fnmatch":
                if p == type(module).__name__ or fnmatch.fnmatchcase(name, p):
                    return True
            elif p.startswith("re:"):
                if re.match(p[3:], name):
                    return True
            elif p in (name, type(module).__name__):
                return True
        return False

    def default_activation(self) -> Scheme | None:
        """The activation scheme the recipe states (``static``: NVFP4 with ``tensor_scale=static``)."""
        if self.activations is None:
            return None
        if self.layout.scheme == NVFP4:
            return dataclasses.replace(NVFP4, tensor_scale=TensorScale.STATIC) if self.activations == "static" else NVFP4
        return CT_MXFP4

    def describe(self) -> dict[str, Any]:
        return {"format": self.name, "layout": self.layout.name, "quant_method": self.quant_method,
                "weights": self.layout.library, "activation_recipe": self.activations or "none (weight only)",
                "ignore": list(self.ignore), "targets": list(self.targets)}


def read_quant_config(pretrained: str, config: Any) -> dict[str, Any] | None:
    """The checkpoint's quantization config: config.json's ``quantization_config``, else a local directory's
    ``hf_quant_config.json`` (older ModelOpt exports)."""
    qc = getattr(config, "quantization_config", None)
    qc = qc if qc is None or isinstance(qc, dict) else qc.to_dict()
    path = os.path.join(str(pretrained), "hf_quant_config.json")
    if not os.path.isfile(path):
        return qc
    with open(path) as f:
        side = {"quant_method": "modelopt", **json.load(f)}
    if qc is not None and _method(qc) == "modelopt":  # both say what is quantized: they must agree
        a, b = _modelopt(qc), _modelopt(side)
        if (a.name, set(a.ignore)) != (b.name, set(b.ignore)):
            raise ShippedCheckpointError(
                f"hf-mx: {pretrained}: config.json's quantization_config ({a.name}, excluded {sorted(a.ignore)}) and "
                f"hf_quant_config.json ({b.name}, excluded {sorted(b.ignore)}) disagree on what is quantized; "
                "make them agree (or remove one)")
    return qc if qc is not None else side


def _method(qc: dict[str, Any]) -> str:
    m = qc.get("quant_method")
    return str(getattr(m, "value", m) or "").lower()


def recognise(qc: dict[str, Any] | None) -> Shipped | None:
    """:class:`Shipped` for a supported format, None for no quantization or ``quant_method="mx"``; raises
    :class:`ShippedCheckpointError` naming what is supported for anything else."""
    if qc is None:
        return None
    method = _method(qc)
    if method == "mx":
        return None
    if method == "compressed-tensors":
        return _compressed_tensors(qc)
    if method == "modelopt":
        return _modelopt(qc)
    if method == "mxfp4":
        raise _unsupported("this checkpoint stores gpt-oss MXFP4 experts (quant_method mxfp4), not supported yet")
    raise _unsupported(f"quantization_config has quant_method {method or 'missing'!r}")


def _ct_group(name: str, group: dict[str, Any], fmt: str) -> tuple[Layout, str | None]:
    w, a = group.get("weights") or {}, group.get("input_activations")
    fmt = group.get("format") or fmt
    nvfp4 = dict(num_bits=4, type="float", strategy="tensor_group", group_size=16, symmetric=True)
    mxfp4 = dict(num_bits=4, type="float", strategy="group", group_size=32, symmetric=True)
    want = {"nvfp4-pack-quantized": nvfp4, "mxfp4-pack-quantized": mxfp4}.get(fmt)
    if want is None:
        raise _unsupported(f"compressed-tensors config group {name} has format {fmt!r}")
    if group.get("output_activations"):
        raise _unsupported(f"compressed-tensors config group {name} quantizes output activations")
    bad = {k: w.get(k) for k, v in want.items() if w.get(k) != v}
    if bad or w.get("dynamic") not in (False, None):
        raise _unsupported(f"compressed-tensors config group {name} ({fmt}) has weights {bad or w} where the format "
                           f"stores {want}")
    layout = LAYOUTS["ct-nvfp4" if fmt == "nvfp4-pack-quantized" else "ct-mxfp4"]
    if not a:
        return layout, None
    a_want = {k: v for k, v in want.items() if k != "symmetric"}
    bad = {k: a.get(k) for k, v in a_want.items() if a.get(k) != v}
    if bad:
        raise _unsupported(f"compressed-tensors config group {name} quantizes input activations with {bad}, not as "
                           f"{fmt}'s activations {a_want}")
    dynamic = str(a.get("dynamic")).lower()
    if fmt == "nvfp4-pack-quantized" and dynamic == "local":  # static input_global_scale, local block scales
        return layout, "static"
    if dynamic == "true":
        return layout, "dynamic"
    raise _unsupported(f"compressed-tensors config group {name}: input activations with dynamic={a.get('dynamic')!r}")


def _compressed_tensors(qc: dict[str, Any]) -> Shipped:
    status = qc.get("quantization_status")
    if status != "compressed":
        raise _unsupported(f"compressed-tensors checkpoint with quantization_status {status!r} (its weights are not "
                           "stored packed; only 'compressed' checkpoints are read as stored)")
    groups = qc.get("config_groups") or {}
    if not groups:
        raise _unsupported("compressed-tensors config without config_groups")
    found = {_ct_group(n, g, qc.get("format") or "") for n, g in groups.items()}
    if len(found) != 1:
        raise _unsupported(f"compressed-tensors config groups of different formats or recipes {sorted(groups)}")
    if qc.get("kv_cache_scheme"):
        raise _unsupported("compressed-tensors config with a kv_cache_scheme")
    if (qc.get("transform_config") or {}).get("config_groups"):
        raise _unsupported("compressed-tensors config with transforms (rotated weights)")
    layout, acts = found.pop()
    targets = tuple(t for g in groups.values() for t in g.get("targets") or ())
    return Shipped(f"compressed-tensors {layout.name.removeprefix('ct-')}-pack-quantized", layout, "compressed-tensors",
                   acts, "input_global_scale" if acts == "static" else None, targets, tuple(qc.get("ignore") or ()),
                   "compressed-tensors", qc)


def _modelopt(qc: dict[str, Any]) -> Shipped:
    details = qc.get("quantization") or qc  # hf_quant_config.json nests it; config.json does not
    algo = str(details.get("quant_algo") or "")
    if algo not in ("NVFP4", "W4A16_NVFP4"):
        raise _unsupported(f"ModelOpt checkpoint with quant_algo {algo or 'missing'!r}")
    if int(details.get("group_size", 16)) != 16:
        raise _unsupported(f"ModelOpt NVFP4 with group_size {details.get('group_size')} (NVFP4 stores 16)")
    if details.get("kv_cache_quant_algo") or qc.get("kv_cache_scheme"):
        raise _unsupported("ModelOpt checkpoint with a quantized KV cache")
    ignore = details.get("exclude_modules", qc.get("ignore")) or ()
    acts = "static" if algo == "NVFP4" else None
    return Shipped(f"ModelOpt {algo}", LAYOUTS["modelopt-nvfp4"], "modelopt", acts,
                   "input_scale" if acts else None, ("Linear",), tuple(ignore), "fnmatch", qc)


# ----------------------------------------------------------------------------------------------------------
# Loading


def _files(pretrained: str, revision: str | None) -> list[str]:
    root = pretrained
    if not os.path.isdir(root):
        from huggingface_hub import snapshot_download

        root = snapshot_download(pretrained, revision=revision, allow_patterns=["*.json", "*.safetensors"])
    index = os.path.join(root, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return sorted({os.path.join(root, v) for v in json.load(f)["weight_map"].values()})
    single = os.path.join(root, "model.safetensors")
    if not os.path.isfile(single):
        raise ShippedCheckpointError(f"hf-mx: {pretrained} has no model.safetensors(.index.json): quantized "
                                     "checkpoints are read from safetensors files")
    return [single]


def _input_scale(shipped: Shipped, key: str, t: torch.Tensor) -> float:
    """The stored input scale as this project's divisor ``ts`` (ModelOpt's ``input_scale`` as it is;
    compressed-tensors' multiplier ``input_global_scale`` as float32 ``1/gs``)."""
    if t.dtype != torch.float32 or t.numel() != 1:
        raise ShippedCheckpointError(f"hf-mx: {key}: expected one float32 value, got {t.dtype} of shape "
                                     f"{tuple(t.shape)}; nothing was evaluated")
    v = t.reshape(())
    ts = (1.0 / v) if shipped.input_scale == "input_global_scale" else v
    if not (torch.isfinite(ts) and ts > 0):
        raise ShippedCheckpointError(f"hf-mx: {key} = {v.item()!r} is not a usable scale; nothing was evaluated")
    return float(ts)


@dataclass
class LoadedLayer:
    name: str
    role: str
    spec: MXSpec
    weight_multiplier: str  # "ts*s8" or "s8/gs"
    a_scale_origin: str | None


def load_shipped(pretrained: str, shipped: Shipped, *, a_scheme: Scheme | None, a_from: str, dtype: torch.dtype,
                 backend: str = "auto", gemm: str = "dequant", revision: str | None = None,
                 trust_remote_code: bool = False) -> tuple[nn.Module, MXReport, dict[str, Any]]:
    """The model with ``shipped``'s quantized linear layers packed as stored; ``a_scheme``: the activation scheme
    (``tensor_scale=static``: each layer's stored input scale), ``a_from``: where it came from. Returns the model,
    its report and a per-layer record for results files."""
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(pretrained, revision=revision, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    candidates, unusable = find_candidates(model)
    report = MXReport(config={"checkpoint": shipped.describe()}, skipped=[(n, "", why) for n, why in unusable])
    report.total_linear_params = sum(c.numel for c in candidates)
    static = a_scheme is not None and a_scheme.tensor_scale is TensorScale.STATIC
    quantized: dict[str, Any] = {}
    for c in candidates:
        if c.kind == "linear" and shipped.quantized(c.name, c.module):
            quantized[c.name] = c
        else:
            report.skipped.append((c.name, c.role, "stored unquantized by the checkpoint"))
    if not quantized:
        raise ShippedCheckpointError(f"hf-mx: {shipped.name}: no linear layer of this model matches the checkpoint's "
                                     f"targets {list(shipped.targets)} outside its ignore list")
    for c in quantized.values():  # a_scale is set once the stored input scales are read
        convert_packed(c.module, MXLinear, MXSpec(shipped.layout.scheme, None if static else a_scheme, None, backend),
                       c.role, gemm)
        c.module.mx_expect_codes()

    # read every tensor; quantized layers' tensors are gathered per layer
    params = dict(model.named_parameters(remove_duplicate=False))
    groups: dict[str, dict[str, torch.Tensor]] = {n: {} for n in quantized}
    own = set(shipped.layout.tensors) | ({shipped.input_scale} if shipped.input_scale else set())
    loaded: set[str] = set()
    for path in _files(pretrained, revision):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                module_name, _, leaf = key.rpartition(".")
                if module_name in quantized and leaf in own:
                    groups[module_name][leaf] = f.get_tensor(key)
                    continue
                if module_name in quantized:
                    if leaf == "bias":
                        _set(model, key, f.get_tensor(key).to(dtype))
                        loaded.add(key)
                        continue
                    raise ShippedCheckpointError(
                        f"hf-mx: {key}: {module_name} is quantized per the checkpoint's config ({shipped.name}), "
                        f"which stores {sorted(own)} for it, not {leaf!r}; nothing was evaluated")
                if leaf in own - {"weight"} or key not in params:
                    why = ("a quantized tensor of a layer the config leaves unquantized" if leaf in own
                           else "no parameter of the model has this name")
                    raise ShippedCheckpointError(f"hf-mx: {key}: {why} ({shipped.name}); nothing was evaluated")
                t = f.get_tensor(key)
                if tuple(t.shape) != tuple(params[key].shape):
                    raise ShippedCheckpointError(f"hf-mx: {key}: shape {tuple(t.shape)}, the model expects "
                                                 f"{tuple(params[key].shape)}; nothing was evaluated")
                _set(model, key, t.to(dtype) if t.is_floating_point() else t)
                loaded.add(key)

    record: dict[str, Any] = {}
    for name, c in quantized.items():
        m: MXPackedLayer = c.module
        tensors = groups[name]
        missing = [f"{name}.{t}" for t in sorted(own) if t not in tensors]
        if missing:
            raise ShippedCheckpointError(f"hf-mx: {', '.join(missing)}: missing from the checkpoint, which its config "
                                         f"({shipped.name}) needs; nothing was evaluated")
        try:
            packed, how = _to_packed(shipped.layout, tensors)
        except ValueError as e:
            raise ShippedCheckpointError(f"hf-mx: {name}: {e}; nothing was evaluated") from None
        want = tuple(m.mx_shapes["weight"])
        if tuple(packed.shape) != want:
            raise ShippedCheckpointError(f"hf-mx: {name}.{shipped.layout.tensors[0]}: stores a weight of shape "
                                         f"{tuple(packed.shape)}, the model's layer is {want}; nothing was evaluated")
        m.weight = nn.Parameter(packed.codes, requires_grad=False)
        m.weight_scales = nn.Parameter(packed.scales, requires_grad=False)
        if packed.tensor_scale is not None:
            m.weight_tensor_scale = nn.Parameter(packed.tensor_scale.reshape(()), requires_grad=False)
        if packed.tensor_scale_divides:
            m.mx_ts_divides = frozenset({"weight"})
        a_scale = None
        if static:
            key = f"{name}.{shipped.input_scale}"
            a_scale = _input_scale(shipped, key, tensors[shipped.input_scale])
        m.mx_spec = MXSpec(shipped.layout.scheme, a_scheme, None, backend, a_scale)
        record[name] = {"role": c.role, "w": shipped.layout.scheme.to_dict(), "weight_from": "checkpoint",
                        "weight_multiplier": how, "a": None if a_scheme is None else a_scheme.to_dict(),
                        "a_from": a_from,
                        "a_tensor_scale": a_scale if static else ("dynamic" if a_scheme is not None and
                                                                  a_scheme.tensor_scale is TensorScale.AMAX else None)}
        if static:
            record[name]["a_tensor_scale_from"] = key
        report.replaced.append(LayerEntry(name, c.role, "linear", shipped.layout.scheme.name,
                                          a_scheme.name if a_scheme else None, c.numel, None,
                                          shipped.layout.scheme.bits()))

    if getattr(model.config.get_text_config(), "tie_word_embeddings", False) or getattr(
            model.config, "tie_word_embeddings", False):
        model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise ShippedCheckpointError(f"hf-mx: {', '.join(left[:5])}{' ...' if len(left) > 5 else ''}: missing from "
                                     f"the checkpoint; nothing was evaluated")
    from ..selection.apply import count_packed_bytes

    count_packed_bytes(model, report)
    return model.eval(), report, record


def _set(model: nn.Module, key: str, t: torch.Tensor) -> None:
    module_name, _, leaf = key.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(t, requires_grad=False)
    else:
        module._buffers[leaf] = t


def _to_packed(layout: Layout, tensors: dict[str, torch.Tensor]) -> tuple[MXPacked, str]:
    """The stored tensors as :class:`MXPacked`, bit-exact against the library's decoding: compressed-tensors NVFP4
    with a float32 ``ts`` where ``ts·s8 == s8/gs`` for every stored scale, else with ``gs`` kept as a divisor.
    A per-tensor scale that is not finite and positive (it would flip or zero the weights) is refused, named."""
    for key in ("weight_global_scale", "weight_scale_2"):
        t = tensors.get(key)
        if t is not None and t.is_floating_point() and not bool((torch.isfinite(t) & (t > 0)).all()):
            raise ValueError(f"{key} = {t.flatten()[:4].tolist()} is not a usable scale (it must be finite and > 0)")
    if layout.name != "ct-nvfp4":
        return layout.to_packed_dict(tensors), "ts*s8" if layout.scheme.tensor_scale is TensorScale.AMAX else "2**(s-127)"
    try:
        return layout.to_packed_dict(tensors, exact=True), "ts*s8"
    except ValueError as e:
        if "no float32 ts" not in str(e):
            raise
    p = layout.to_packed_dict(tensors, exact=False)
    gs = tensors["weight_global_scale"].reshape(())
    return dataclasses.replace(p, tensor_scale=gs, tensor_scale_divides=True), "s8/gs"

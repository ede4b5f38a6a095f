"""What a reader module describes (:class:`Shipped`, :class:`LayerRecipe`, :class:`Activation`) and the one loader
that reads any of them tensor by tensor (:func:`load_shipped`)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...nn.layers import MXLinear, MXPackedLayer, convert_packed
from ...nn.spec import MXSpec
from ...numerics.formats import Scheme, TensorScale
from ...numerics.layouts import Layout
from ...numerics.packing import MXPacked
from ...selection.report import LayerEntry, MXReport
from ...selection.roles import find_candidates


class ShippedCheckpointError(ValueError):
    """A checkpoint whose quantization hf-mx cannot evaluate as stored, or whose tensors disagree with it."""


# What each registered reader module reads (its SUPPORTED lines), filled by the package's ``__init__``.
SUPPORTED_BY: dict[str, tuple[str, ...]] = {}
OWN = "lm-eval-mx's own packed checkpoints (quant_method mx)"


def supported() -> tuple[str, ...]:
    return (*(s for lines in SUPPORTED_BY.values() for s in lines), OWN)


def unsupported(what: str) -> ShippedCheckpointError:
    """The refusal of a checkpoint, naming every supported format."""
    return ShippedCheckpointError(
        f"hf-mx: {what}. Supported quantized checkpoints: {'; '.join(supported())}. Other quantized checkpoints "
        f"(AWQ, int GPTQ, bitsandbytes, FP8...) are not supported by hf-mx; evaluate them with lm-eval's hf model"
    )


@dataclass(frozen=True)
class Activation:
    """How a layer's inputs are quantized when the checkpoint's own runtime evaluates it.

    ``kind``: ``"none"`` (weight only), ``"dynamic"`` (``scheme``: the format's run-time rule, scales from each
    input) or ``"static"`` (``scheme`` with ``tensor_scale=static``; its per-tensor scale is the stored tensor
    ``tensor`` beside the weight, a divisor ``ts``, or a multiplier ``1/ts`` when ``reciprocal``)."""

    kind: str = "none"
    scheme: Scheme | None = None
    tensor: str | None = None
    reciprocal: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("none", "dynamic", "static"):
            raise ValueError(f"Activation.kind {self.kind!r}: none, dynamic or static")
        if (self.kind == "none") != (self.scheme is None) or (self.kind == "static") != (self.tensor is not None):
            raise ValueError(f"Activation {self}: a scheme for dynamic/static, a stored tensor for static only")


NO_ACTIVATION = Activation()
Converter = Callable[[Layout, Mapping[str, torch.Tensor]], "tuple[MXPacked, str]"]


def layout_to_packed(layout: Layout, tensors: Mapping[str, torch.Tensor]) -> tuple[MXPacked, str]:
    """The stored tensors as :class:`MXPacked` by the layout's own conversion, and how the weight's multiplier is
    formed (for the per-layer record)."""
    packed = layout.to_packed_dict(tensors)
    return packed, "ts*s8" if layout.scheme.tensor_scale is TensorScale.AMAX else "2**(s-127)"


@dataclass(frozen=True)
class LayerRecipe:
    """One quantized layer as a checkpoint stores it: the :class:`Layout` of its weight tensors, its
    :class:`Activation` recipe, where in the config it came from (``source``, recorded per layer) and the function
    turning its stored tensors into :class:`MXPacked` (``convert``; a format with an inexact scale order gives its
    own)."""

    layout: Layout
    activation: Activation = NO_ACTIVATION
    source: str = ""
    convert: Converter = layout_to_packed

    @property
    def stored(self) -> tuple[str, ...]:
        """The tensor names the checkpoint stores for such a layer (leaf names beside ``weight``'s module)."""
        return self.layout.tensors + ((self.activation.tensor,) if self.activation.tensor else ())

    def describe(self) -> dict[str, Any]:
        a = self.activation
        return {"layout": self.layout.name, "weights": self.layout.library, "w": self.layout.scheme.name,
                "activation_recipe": a.kind if a.kind != "none" else "none (weight only)",
                "a": a.scheme.name if a.scheme else None, **({"a_scale_tensor": a.tensor} if a.tensor else {}),
                **({"source": self.source} if self.source else {})}


@dataclass(frozen=True)
class Shipped:
    """A checkpoint format hf-mx reads as stored. A reader module returns a subclass from its ``recognise(qc)``
    that answers, for each linear layer (or fused experts module) of the model, :meth:`recipe_for`; ``recipes``
    lists every recipe its config states (checked before loading, shown in the report)."""

    name: str  # e.g. "compressed-tensors nvfp4-pack-quantized"
    quant_method: str
    recipes: tuple[LayerRecipe, ...]
    config: dict[str, Any] = field(compare=False, repr=False)

    def recipe_for(self, name: str, module: nn.Module) -> LayerRecipe | None:
        """The recipe of the model's module ``name`` as the checkpoint stores it, None where it is stored as is."""
        raise NotImplementedError

    def rename(self, key: str) -> str:
        """The model's name for a checkpoint tensor ``key`` (identity unless the format names tensors otherwise)."""
        return key

    @property
    def weight_only(self) -> bool:
        return all(r.activation.kind == "none" for r in self.recipes)

    @property
    def weight_scheme(self) -> Scheme:
        """The weights' scheme (the first recipe's, for labels; each layer records its own)."""
        return self.recipes[0].layout.scheme

    def default_activation(self) -> Scheme | None:
        """The activation scheme the recipes state, when they all state the same one (else each layer its own)."""
        schemes = {r.activation.scheme for r in self.recipes}
        return schemes.pop() if len(schemes) == 1 else None

    def describe(self) -> dict[str, Any]:
        first = self.recipes[0]
        out = {"format": self.name, "quant_method": self.quant_method, "layout": first.layout.name,
               "weights": first.layout.library,
               "activation_recipe": first.describe()["activation_recipe"] if len(self.recipes) == 1 else "per layer"}
        if len(self.recipes) > 1:
            out["recipes"] = [r.describe() for r in self.recipes]
        return out


# ----------------------------------------------------------------------------------------------------------
# Loading


def read_quant_config(pretrained: str, config: Any) -> dict[str, Any] | None:
    """The checkpoint's quantization config: config.json's ``quantization_config``, else a local directory's
    ``hf_quant_config.json`` (older ModelOpt exports)."""
    qc = getattr(config, "quantization_config", None)
    if qc is not None:
        return qc if isinstance(qc, dict) else qc.to_dict()
    path = os.path.join(str(pretrained), "hf_quant_config.json")
    if os.path.isfile(path):
        with open(path) as f:
            return {"quant_method": "modelopt", **json.load(f)}
    return None


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


def _input_scale(recipe: LayerRecipe, key: str, t: torch.Tensor) -> float:
    """The stored input scale as this project's divisor ``ts`` (as stored, or ``1/value`` for a multiplier such as
    compressed-tensors' ``input_global_scale``, in float32)."""
    if t.dtype != torch.float32 or t.numel() != 1:
        raise ShippedCheckpointError(f"hf-mx: {key}: expected one float32 value, got {t.dtype} of shape "
                                     f"{tuple(t.shape)}; nothing was evaluated")
    v = t.reshape(())
    ts = (1.0 / v) if recipe.activation.reciprocal else v
    if not (torch.isfinite(ts) and ts > 0):
        raise ShippedCheckpointError(f"hf-mx: {key} = {v.item()!r} is not a usable scale; nothing was evaluated")
    return float(ts)


@dataclass
class _Plan:
    """The quantized layers of one load: name -> (candidate, recipe), and what each reads."""

    layers: dict[str, tuple[Any, LayerRecipe]]
    tensors: dict[str, dict[str, torch.Tensor]]


def _plan(candidates: list[Any], shipped: Shipped, report: MXReport,
          a_override: tuple[Scheme | None, str] | None, backend: str, gemm: str) -> _Plan:
    report.total_linear_params = sum(c.numel for c in candidates)
    layers: dict[str, tuple[Any, LayerRecipe]] = {}
    for c in candidates:
        recipe = shipped.recipe_for(c.name, c.module) if c.kind == "linear" else None
        if recipe is None:
            report.skipped.append((c.name, c.role, "stored unquantized by the checkpoint"))
            continue
        layers[c.name] = (c, recipe)
        a = _layer_activation(recipe, a_override)
        static = a is not None and a.tensor_scale is TensorScale.STATIC
        # a static activation scale is set once the stored input scale is read
        convert_packed(c.module, MXLinear, MXSpec(recipe.layout.scheme, None if static else a, None, backend),
                       c.role, gemm)
        c.module.mx_expect_codes()
    if not layers:
        raise ShippedCheckpointError(f"hf-mx: {shipped.name}: no linear layer of this model is quantized by the "
                                     f"checkpoint's config ({shipped.describe()})")
    return _Plan(layers, {n: {} for n in layers})


def _layer_activation(recipe: LayerRecipe, a_override: tuple[Scheme | None, str] | None) -> Scheme | None:
    return recipe.activation.scheme if a_override is None else a_override[0]


def _read(model: nn.Module, shipped: Shipped, plan: _Plan, files: list[str], dtype: torch.dtype) -> None:
    """Every stored tensor: a quantized layer's own tensors gathered per layer, the others loaded as stored."""
    from safetensors import safe_open

    params = dict(model.named_parameters(remove_duplicate=False))
    own_anywhere = {t for _, r in plan.layers.values() for t in r.stored}
    for path in files:
        with safe_open(path, framework="pt") as f:
            for stored_key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                key = shipped.rename(stored_key)
                module_name, _, leaf = key.rpartition(".")
                if module_name in plan.layers:
                    recipe = plan.layers[module_name][1]
                    if leaf in recipe.stored:
                        plan.tensors[module_name][leaf] = f.get_tensor(stored_key)
                    elif leaf == "bias":
                        _set(model, key, f.get_tensor(stored_key).to(dtype))
                    else:
                        raise ShippedCheckpointError(
                            f"hf-mx: {stored_key}: {module_name} is quantized per the checkpoint's config "
                            f"({shipped.name}), which stores {sorted(recipe.stored)} for it, not {leaf!r}; nothing "
                            f"was evaluated")
                    continue
                if leaf in own_anywhere - {"weight"} or key not in params:
                    why = ("a quantized tensor of a layer the config leaves unquantized" if leaf in own_anywhere
                           else "no parameter of the model has this name")
                    raise ShippedCheckpointError(f"hf-mx: {stored_key}: {why} ({shipped.name}); nothing was "
                                                 "evaluated")
                t = f.get_tensor(stored_key)
                if tuple(t.shape) != tuple(params[key].shape):
                    raise ShippedCheckpointError(f"hf-mx: {stored_key}: shape {tuple(t.shape)}, the model expects "
                                                 f"{tuple(params[key].shape)}; nothing was evaluated")
                _set(model, key, t.to(dtype) if t.is_floating_point() else t)


def _fill(name: str, c: Any, recipe: LayerRecipe, tensors: dict[str, torch.Tensor], shipped: Shipped,
          a_override: tuple[Scheme | None, str] | None, backend: str) -> dict[str, Any]:
    """One quantized layer from its stored tensors; returns its record."""
    m: MXPackedLayer = c.module
    missing = [f"{name}.{t}" for t in recipe.stored if t not in tensors]
    a_scheme = _layer_activation(recipe, a_override)
    static = a_scheme is not None and a_scheme.tensor_scale is TensorScale.STATIC
    if static and recipe.activation.tensor is None:
        raise ShippedCheckpointError(f"hf-mx: {name}: tensor_scale=static takes the checkpoint's stored input scale, "
                                     f"and this layer's recipe ({recipe.layout.library}, weight only) stores none; "
                                     "give tensor_scale=amax or omit a_format")
    if missing:
        raise ShippedCheckpointError(f"hf-mx: {', '.join(missing)}: missing from the checkpoint, which its config "
                                     f"({shipped.name}) needs; nothing was evaluated")
    try:
        packed, how = recipe.convert(recipe.layout, tensors)
    except ValueError as e:
        raise ShippedCheckpointError(f"hf-mx: {name}: {e}; nothing was evaluated") from None
    want = tuple(m.mx_shapes["weight"])
    if tuple(packed.shape) != want:
        raise ShippedCheckpointError(f"hf-mx: {name}.{recipe.layout.tensors[0]}: stores a weight of shape "
                                     f"{tuple(packed.shape)}, the model's layer is {want}; nothing was evaluated")
    m.weight = nn.Parameter(packed.codes, requires_grad=False)
    m.weight_scales = nn.Parameter(packed.scales, requires_grad=False)
    if packed.tensor_scale is not None:
        m.weight_tensor_scale = nn.Parameter(packed.tensor_scale.reshape(()), requires_grad=False)
    if packed.tensor_scale_divides:
        m.mx_ts_divides = frozenset({"weight"})
    a_scale = None
    if static:
        key = f"{name}.{recipe.activation.tensor}"
        a_scale = _input_scale(recipe, key, tensors[recipe.activation.tensor])
    m.mx_spec = MXSpec(recipe.layout.scheme, a_scheme, None, backend, a_scale)
    record = {"role": c.role, "w": recipe.layout.scheme.to_dict(), "weight_from": "checkpoint",
              "weight_multiplier": how, "a": None if a_scheme is None else a_scheme.to_dict(),
              "a_from": "checkpoint" if a_override is None else a_override[1],
              "a_tensor_scale": a_scale if static else ("dynamic" if a_scheme is not None and
                                                        a_scheme.tensor_scale is TensorScale.AMAX else None)}
    if static:
        record["a_tensor_scale_from"] = key
    if recipe.source:
        record["recipe"] = recipe.source
    return record


def load_shipped(pretrained: str, shipped: Shipped, *, activations: tuple[Scheme | None, str] | None,
                 dtype: torch.dtype, backend: str = "auto", gemm: str = "dequant", revision: str | None = None,
                 trust_remote_code: bool = False) -> tuple[nn.Module, MXReport, dict[str, Any]]:
    """The model with ``shipped``'s quantized layers packed as stored. ``activations``: None for each layer's own
    recipe, else ``(scheme, where it came from)`` for every quantized layer (``tensor_scale=static``: each layer's
    stored input scale). Returns the model, its report and a per-layer record for results files."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(pretrained, revision=revision, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    candidates, unusable = find_candidates(model)
    report = MXReport(config={"checkpoint": shipped.describe()}, skipped=[(n, "", why) for n, why in unusable])
    plan = _plan(candidates, shipped, report, activations, backend, gemm)
    _read(model, shipped, plan, _files(pretrained, revision), dtype)
    record: dict[str, Any] = {}
    for name, (c, recipe) in plan.layers.items():
        record[name] = _fill(name, c, recipe, plan.tensors[name], shipped, activations, backend)
        a = _layer_activation(recipe, activations)
        report.replaced.append(LayerEntry(name, c.role, "linear", recipe.layout.scheme.name,
                                          a.name if a else None, c.numel, None,
                                          recipe.layout.scheme.bits()))
    if getattr(model.config.get_text_config(), "tie_word_embeddings", False) or getattr(
            model.config, "tie_word_embeddings", False):
        model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise ShippedCheckpointError(f"hf-mx: {', '.join(left[:5])}{' ...' if len(left) > 5 else ''}: missing from "
                                     f"the checkpoint; nothing was evaluated")
    from ...selection.apply import count_packed_bytes

    count_packed_bytes(model, report)
    return model.eval(), report, record


def _set(model: nn.Module, key: str, t: torch.Tensor) -> None:
    module_name, _, leaf = key.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(t, requires_grad=False)
    else:
        module._buffers[leaf] = t



"""What a reader module describes: :class:`Shipped` (a format, answering per layer), :class:`LayerRecipe` (what one
layer stores), :class:`Activation` (how its inputs are quantized), and the refusal naming what is supported.
:mod:`.loader` reads any of them tensor by tensor."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...numerics.formats import Scheme, TensorScale
from ...numerics.layouts import Layout
from ...numerics.packing import MXPacked


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
    ``tensor`` beside the weight, a divisor ``ts``, or a multiplier ``1/ts`` when ``reciprocal``; the layer holds it as
    its step takes it: a multiplier for ``e4m3_steps=divide``, a divisor otherwise). ``rule``: the
    runtime's own arithmetic where it is not ``scheme``'s (a name in :data:`lm_eval_mx.numerics.runtimes.RULES`; a
    static rule takes the stored value as stored)."""

    kind: str = "none"
    scheme: Scheme | None = None
    tensor: str | None = None
    reciprocal: bool = False
    rule: str | None = None

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
                **({"a_rule": a.rule} if a.rule else {}),
                **({"source": self.source} if self.source else {})}


# The names one expert's projections go by in per-expert checkpoints, as transformers' conversion rules read them:
# Qwen2-MoE's (gate_proj, up_proj -> gate_up_proj; down_proj) and Mixtral's (w1, w3 -> gate_up_proj; w2 -> down_proj).
_EXPERT_NAMINGS = ({"gate_up_proj": ("gate_proj", "up_proj"), "up_proj": ("up_proj",), "down_proj": ("down_proj",)},
                   {"gate_up_proj": ("w1", "w3"), "up_proj": ("w3",), "down_proj": ("w2",)})


def expert_linear_names(name: str, module: nn.Module) -> list[list[str]]:
    """Per naming family (Qwen2-MoE's, Mixtral's, each also under Mixtral's ``block_sparse_moe``), the names expert
    0's projections of fused experts ``name`` go by in a per-expert checkpoint, to match a format's targets and
    ignore lists as the tool that wrote it did; empty for a module that is not fused experts."""
    weights = [w for w in ("gate_up_proj", "up_proj", "down_proj")
               if isinstance(getattr(module, w, None), torch.Tensor) and getattr(module, w).dim() == 3]
    if not weights:
        return []
    if "gate_up_proj" in weights:
        weights = [w for w in weights if w != "up_proj"]
    families = []
    for naming in _EXPERT_NAMINGS:
        for prefix in dict.fromkeys((name, name.replace(".mlp.", ".block_sparse_moe."))):
            families.append([f"{prefix}.0.{p}" for w in weights for p in naming[w]])
    return families


# The module names the checkpoint being loaded stores tensors for (set by the loader while it plans): the naming
# family of per-expert projections a checkpoint uses is the one its keys have.
STORED_MODULES: ContextVar[frozenset[str]] = ContextVar("STORED_MODULES", default=frozenset())


def experts_recipe(name: str, module: nn.Module, recipe_of_linear: Callable[[str], LayerRecipe | None]
                   ) -> LayerRecipe | None:
    """Fused experts' recipe from their per-expert projections' (``recipe_of_linear(name)`` of an ``nn.Linear`` so
    named, in the naming family the checkpoint's keys use, else every family): the recipe every projection of a
    family the config matches agrees on, None where none matches; refused where projections disagree (one fused
    experts module holds one recipe)."""
    families = expert_linear_names(name, module)
    stored = STORED_MODULES.get()
    families = [f for f in families if all(n in stored for n in f)] or families
    found: set[LayerRecipe | None] = set()
    for family in families:
        recipes = {recipe_of_linear(n) for n in family}
        if recipes != {None}:
            found |= recipes
    if len(found) > 1:
        raise unsupported(f"{name}: the experts' projections (gate, up, down) have different recipes "
                          f"({', '.join(sorted(r.source or r.layout.name if r else 'unquantized' for r in found))}); "
                          "one fused experts module holds one")
    return found.pop() if found else None


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
        if len(self.recipes) == 1 and first.activation.rule:
            out["activation_rule"] = first.activation.rule  # the runtime's own arithmetic (numerics.runtimes)
        if len(self.recipes) > 1:
            out["recipes"] = [r.describe() for r in self.recipes]
        return out


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
    if qc is not None and str(qc.get("quant_method") or "").lower() == "modelopt":  # both say what is quantized
        from .modelopt import recognise

        a, b = recognise(qc), recognise(side)
        if (a.name, set(a.exclude)) != (b.name, set(b.exclude)):
            raise ShippedCheckpointError(
                f"hf-mx: {pretrained}: config.json's quantization_config ({a.name}, excluded {sorted(a.exclude)}) and "
                f"hf_quant_config.json ({b.name}, excluded {sorted(b.exclude)}) disagree on what is quantized; "
                "make them agree (or remove one)")
    return qc if qc is not None else side

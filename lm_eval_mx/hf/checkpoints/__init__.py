"""Checkpoints quantized by other tools, evaluated with their weights as stored: one reader module per format.

:func:`recognise` reads a checkpoint's ``quantization_config`` (config.json, or ModelOpt's ``hf_quant_config.json``:
:func:`read_quant_config`) and dispatches on its ``quant_method`` to the reader registered for it; it returns a
:class:`Shipped` description, None for an unquantized checkpoint or one of this project's own
(``quant_method="mx"``, :mod:`lm_eval_mx.hf.quantizer`), and raises :class:`ShippedCheckpointError` naming every
supported format (:data:`SUPPORTED`, built from the readers) for anything else. :func:`load_shipped` (:mod:`.loader`)
builds the model on the meta device, turns every layer the checkpoint quantized into a packed MX layer, reads the
safetensors files tensor by tensor straight onto each module's device, converts each quantized layer's stored tensors
with :mod:`lm_eval_mx.numerics.layouts` (codes and scale bytes as they are: no high-precision copy) and loads every
other tensor as stored. Per-expert tensors go into transformers' fused experts by transformers' own conversion rules
(:mod:`.experts`). A tensor that disagrees with the config is an error naming it.

Adding a format = adding a module here and its name to :data:`READERS`. A reader module provides:

* ``QUANT_METHODS``: the ``quant_method`` values it reads (e.g. ``("modelopt",)``);
* ``SUPPORTED``: one line per supported variant, for refusals;
* ``recognise(qc) -> Shipped``: checks the whole config before anything loads (refusing with
  :func:`base.unsupported`, which names everything supported) and returns a :class:`Shipped` subclass that answers
  per layer ``recipe_for(name, module) -> LayerRecipe | None`` (None: stored as is) and, where the format names
  tensors unlike the model, ``rename(checkpoint_key) -> model_key``. ``Shipped.recipes`` lists every distinct
  recipe of the config (mixed recipes: several).

A :class:`LayerRecipe` is what one layer stores and how its inputs are quantized: ``layout``
(a :class:`~lm_eval_mx.numerics.layouts.Layout`: the weight tensors' names, their codec and the weights' Scheme),
``activation`` (an :class:`Activation`: ``none``; ``dynamic`` with the Scheme that is the format's own run-time
rule; or ``static`` with the stored per-tensor tensor's name and whether it is a divisor or a multiplier),
``source`` (where in the config it came from, recorded per layer in results) and ``convert`` (stored tensors ->
:class:`~lm_eval_mx.numerics.packing.MXPacked`, the layout's own unless the format needs more).
The loader asks nothing else of a format: numerics stay in :mod:`lm_eval_mx.numerics.layouts` (tensors in,
tensors out), one codec module per format there too.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from . import compressed_tensors, gptoss, modelopt
from .base import (
    NO_ACTIVATION,
    SUPPORTED_BY,
    Activation,
    LayerRecipe,
    Shipped,
    ShippedCheckpointError,
    read_quant_config,
    supported,
    unsupported,
)
from .loader import load_shipped

READERS: tuple[ModuleType, ...] = (compressed_tensors, modelopt, gptoss)
_BY_METHOD: dict[str, ModuleType] = {}
for _reader in READERS:
    SUPPORTED_BY[_reader.__name__] = _reader.SUPPORTED
    _BY_METHOD.update(dict.fromkeys(_reader.QUANT_METHODS, _reader))
SUPPORTED: tuple[str, ...] = supported()


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
    reader = _BY_METHOD.get(method)
    if reader is None:
        raise unsupported(f"quantization_config has quant_method {method or 'missing'!r}")
    return reader.recognise(qc)


__all__ = ["NO_ACTIVATION", "READERS", "SUPPORTED", "Activation", "LayerRecipe", "Shipped", "ShippedCheckpointError",
           "load_shipped", "read_quant_config", "recognise", "unsupported"]

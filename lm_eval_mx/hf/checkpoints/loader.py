"""The one loader of shipped checkpoints: the model built on the meta device, each layer the checkpoint quantized
turned into a packed MX layer, every stored tensor read once, straight to the device its module is placed on.

Step by step (:func:`load_shipped`):

1. the model is built from its config on the meta device (no weights anywhere);
2. each linear layer or fused experts module the format's :meth:`Shipped.recipe_for` names is converted to a
   packed layer expecting codes (still on meta); its weight count is taken before (the report counts weights);
3. each module is given a device: ``device_map`` (one device, a ``{module prefix: device}`` map, or ``"auto"``:
   accelerate's map computed on the packed meta model), else ``device``;
4. each safetensors file is opened in turn and each tensor read and moved at once to its module's device:
   a quantized layer's stored tensors are kept per layer (per expert and part for per-expert storage,
   :mod:`.experts`), every other tensor is put in place as stored (floating point cast to ``dtype``);
5. each quantized layer is filled from its tensors on its device (:meth:`MXPackedLayer.mx_fill`): per-expert
   tensors concatenated (gate, up) and stacked (experts) there first, per-tensor scales required equal across
   the parts of one expert; stored input scales become the layer's (or each expert's) static activation scale.

The host never holds more than the tensor being moved (and the safetensors file mapping it is read from).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...nn.layers import MXPackedLayer, convert_packed
from ...nn.spec import MXSpec
from ...numerics.formats import E4M3Steps, Scheme, TensorScale
from ...selection.report import LayerEntry, MXReport
from ...selection.roles import MIXINS, find_candidates
from .base import STORED_MODULES, LayerRecipe, Shipped, ShippedCheckpointError
from .experts import Locator, Slot

Activations = tuple[Scheme | None, str] | None  # None: each layer's recipe; else (scheme, where it came from)


def _error(what: str) -> ShippedCheckpointError:
    return ShippedCheckpointError(f"hf-mx: {what}; nothing was evaluated")


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


@dataclass
class _Layer:
    """One quantized module: its candidate, recipe, weight count (before packing) and the stored tensors read,
    keyed by (weight, expert, part) then leaf name."""

    candidate: Any
    recipe: LayerRecipe
    numel: int
    stored: dict[tuple[str, int | None, int], dict[str, torch.Tensor]]


def _layer_activation(recipe: LayerRecipe, activations: Activations) -> Scheme | None:
    return recipe.activation.scheme if activations is None else activations[0]


def _static(a: Scheme | None) -> bool:
    return a is not None and a.tensor_scale is TensorScale.STATIC


def _plan(candidates: list[Any], shipped: Shipped, report: MXReport, activations: Activations, backend: str,
          gemm: str) -> dict[str, _Layer]:
    layers: dict[str, _Layer] = {}
    for c in candidates:
        recipe = shipped.recipe_for(c.name, c.module) if c.kind in ("linear", "experts") else None
        if recipe is None:
            report.skipped.append((c.name, c.role, "stored unquantized by the checkpoint"))
            continue
        a = _layer_activation(recipe, activations)
        if _static(a) and recipe.activation.tensor is None:
            raise ShippedCheckpointError(
                f"hf-mx: {c.name}: tensor_scale=static takes the checkpoint's stored input scale, and this layer's "
                f"recipe ({recipe.layout.library}, activations {recipe.activation.kind}) stores none; give "
                "tensor_scale=amax or omit a_format")
        layers[c.name] = _Layer(c, recipe, c.numel, defaultdict(dict))
        # a static activation scale is set once the stored input scale is read
        convert_packed(c.module, MIXINS[c.kind], MXSpec(recipe.layout.scheme, None if _static(a) else a, None,
                                                        backend), c.role, gemm)
        c.module.mx_expect_codes()
    if not layers:
        raise ShippedCheckpointError(f"hf-mx: {shipped.name}: no layer of this model is quantized by the "
                                     f"checkpoint's config ({shipped.describe()})")
    return layers


def _placement(model: nn.Module, device_map: Any, device: str | torch.device | None, dtype: torch.dtype
               ) -> dict[str, str]:
    """``{module prefix: device}`` ("" = the whole model) from ``device_map`` (a device, a map or "auto") or
    ``device``; every device named must be usable here."""
    if device_map in (None, "", {}):
        placed = {"": str(device or "cpu")}
    elif isinstance(device_map, dict):
        placed = {str(k): str(v) for k, v in device_map.items()}
    elif str(device_map) == "auto":
        from accelerate import infer_auto_device_map

        placed = {k: str(v) for k, v in infer_auto_device_map(
            model, no_split_module_classes=getattr(model, "_no_split_modules", None) or [], dtype=dtype).items()}
    else:
        placed = {"": str(device_map)}
    for where in set(placed.values()):
        if where == "disk":
            raise ShippedCheckpointError(f"hf-mx: device_map places modules on {where!r}: shipped checkpoints load "
                                         "tensor by tensor onto devices (cpu, cuda:N), not onto disk")
        try:
            torch.empty(0, device=int(where) if where.isdigit() else where)
        except (RuntimeError, AssertionError) as e:
            raise ShippedCheckpointError(f"hf-mx: device {where!r} is not usable here ({e})") from None
    return {k: (f"cuda:{v}" if v.isdigit() else v) for k, v in placed.items()}


def _device_of(placed: dict[str, str], name: str) -> str:
    """The device of module/tensor ``name``: the longest prefix of ``placed`` naming it or a parent."""
    best, best_len = placed.get("", "cpu"), -1
    for prefix, where in placed.items():
        if prefix and (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_len:
            best, best_len = where, len(prefix)
    return best


def _read(model: nn.Module, shipped: Shipped, layers: dict[str, _Layer], candidates: list[Any], files: list[str],
          dtype: torch.dtype, placed: dict[str, str]) -> None:
    """Every stored tensor, each moved to its module's device as it is read (step 4 of the module docstring);
    experts the config leaves unquantized but stores per expert are fused as transformers fuses them."""
    from safetensors import safe_open

    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    dense = {c.name: c.module for c in candidates if c.kind == "experts" and c.name not in layers}
    locator = Locator(model, {**dense, **{n: layer.candidate.module for n, layer in layers.items()}})
    own_anywhere = {t for layer in layers.values() for t in layer.recipe.stored}
    per_expert: dict[tuple[str, str], dict[tuple[int | None, int], dict[str, torch.Tensor]]] = defaultdict(
        lambda: defaultdict(dict))
    for path in files:
        with safe_open(path, framework="pt") as f:
            for stored_key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                key = shipped.rename(stored_key)
                slot = locator.locate(key)
                if slot is not None and slot.module in dense and slot.expert is not None and slot.leaf == "weight":
                    t = f.get_tensor(stored_key)  # an unquantized expert's projection, fused below
                    per_expert[(slot.module, slot.weight)][(slot.expert, slot.part)]["weight"] = \
                        t.to(dtype).to(_device_of(placed, slot.module))
                    continue
                if slot is not None and slot.module in layers and slot.leaf in layers[slot.module].recipe.stored:
                    device = _device_of(placed, slot.module)
                    layers[slot.module].stored[(slot.weight, slot.expert, slot.part)][slot.leaf] = \
                        f.get_tensor(stored_key).to(device)
                    continue
                if key not in params and key not in buffers and locator.renamed(key) in params:
                    key = locator.renamed(key)
                if key not in params and key not in buffers:
                    _refuse_unknown(stored_key, key, slot, layers, shipped, own_anywhere)
                t = f.get_tensor(stored_key)
                want = params[key] if key in params else buffers[key]
                if tuple(t.shape) != tuple(want.shape):
                    raise _error(f"{stored_key}: shape {tuple(t.shape)}, the model expects {tuple(want.shape)}")
                t = t.to(dtype) if t.is_floating_point() else t
                _set(model, key, t.to(_device_of(placed, key)))
    for (module, weight), got in per_expert.items():  # experts left unquantized, stored per expert: fused as stored
        m = dense[module]
        fused = _assemble(f"{module}.{weight}", got, getattr(m, weight).shape[0])["weight"]
        if getattr(m, "is_transposed", False):
            fused = fused.transpose(-1, -2)
        if tuple(fused.shape) != tuple(getattr(m, weight).shape):
            raise _error(f"{module}.{weight}: its per-expert tensors fuse to {tuple(fused.shape)}, the model expects "
                         f"{tuple(getattr(m, weight).shape)}")
        _set(model, f"{module}.{weight}", fused.contiguous())


def _refuse_unknown(stored_key: str, key: str, slot: Slot | None, layers: dict[str, _Layer], shipped: Shipped,
                    own_anywhere: set[str]) -> None:
    if slot is not None and slot.module not in layers:
        raise _error(f"{stored_key}: the config leaves {slot.module} unquantized ({shipped.name}), and it stores "
                     f"{slot.leaf!r} for it, not a high-precision weight")
    if slot is not None:
        recipe = layers[slot.module].recipe
        raise _error(f"{stored_key}: {slot.module} is quantized per the checkpoint's config ({shipped.name}), which "
                     f"stores {sorted(recipe.stored)} for it, not {slot.leaf!r}")
    leaf = key.rpartition(".")[2]
    why = ("a quantized tensor of a layer the config leaves unquantized" if leaf in own_anywhere
           else "no parameter of the model has this name")
    raise _error(f"{stored_key}: {why} ({shipped.name})")


def _one(name: str, leaf: str, tensors: list[torch.Tensor]) -> torch.Tensor:
    """A per-tensor value shared by the parts of one expert (ModelOpt's w1/w3 ``weight_scale_2``): equal, or refused."""
    if any(not torch.equal(t.reshape(-1), tensors[0].reshape(-1)) for t in tensors[1:]):
        raise _error(f"{name}.{leaf}: the parts fused into one weight (gate, up) store different per-tensor values "
                     f"{[t.reshape(-1).tolist() for t in tensors]}; a fused weight holds one per expert")
    return tensors[0].reshape(())


def _assemble(where: str, got: dict[tuple[int | None, int], dict[str, torch.Tensor]], experts: int
              ) -> dict[str, torch.Tensor]:
    """One weight's stored tensors by leaf, from ``got`` keyed by (expert, part): as read for a linear layer or fused
    storage (one entry, expert None); per-expert storage concatenated over parts along the output axis (gate then
    up, transformers' order) and stacked over experts."""
    if list(got) == [(None, 0)]:
        return got[(None, 0)]
    parts = 1 + max(p for _, p in got)
    missing = [f"expert {e} part {p}" for e in range(experts) for p in range(parts) if (e, p) not in got]
    if missing or any(e is None for e, _ in got):
        raise _error(f"{where}: the checkpoint stores {len(got)} per-expert tensors of {experts} experts x "
                     f"{parts} parts; missing {', '.join(missing[:4])}")
    out: dict[str, torch.Tensor] = {}
    for leaf in set(got[(0, 0)]):
        per_expert = []
        for e in range(experts):
            ts = [got[(e, p)].get(leaf) for p in range(parts)]
            if any(t is None for t in ts):
                raise _error(f"{where}: expert {e} lacks {leaf} in some of its parts")
            per_expert.append(_one(f"{where}[{e}]", leaf, ts) if ts[0].numel() == 1 else torch.cat(ts, dim=0))
        out[leaf] = torch.stack(per_expert)
    return out


def _input_scales(name: str, recipe: LayerRecipe, t: torch.Tensor, a_scheme: Scheme, rule: str | None) -> list[float]:
    """The stored input scale(s) as the layer's activation step takes them, in float32: one value, or one per expert.
    A runtime rule takes the value as stored; ``e4m3_steps=divide`` (compressed-tensors' steps) a multiplier ``gs``;
    every other scheme a divisor ``ts``. A stored value of the other kind (``Activation.reciprocal``: the checkpoint
    stores a multiplier) is taken as its float32 reciprocal."""
    key = f"{name}.{recipe.activation.tensor}"
    if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):  # a bf16 model's Quark input_scale is bf16
        raise _error(f"{key}: expected float32 (or bfloat16/float16) values, got {t.dtype} of shape "
                     f"{tuple(t.shape)}")
    v = t.reshape(-1).cpu().float()  # exact
    multiplier = a_scheme.e4m3_steps is E4M3Steps.DIVIDE
    ts = v if rule is not None or recipe.activation.reciprocal == multiplier else 1.0 / v
    if not bool((torch.isfinite(ts) & (ts > 0)).all()):
        raise _error(f"{key} = {v.tolist()!r} is not a usable scale")
    return ts.tolist()


def _fill(name: str, layer: _Layer, shipped: Shipped, activations: Activations, backend: str) -> dict[str, Any]:
    """One quantized module from its stored tensors; returns its record (step 5 of the module docstring)."""
    m: MXPackedLayer = layer.candidate.module
    recipe = layer.recipe
    a_scheme = _layer_activation(recipe, activations)
    a_scales: dict[str, list[float]] = {}
    rule = recipe.activation.rule if activations is None else None
    hows = set()
    for weight in sorted(m.mx_prequantized):
        where = name if weight == "weight" else f"{name}.{weight}"
        got = {k[1:]: v for k, v in layer.stored.items() if k[0] == weight}
        tensors = _assemble(where, got, m.mx_shapes[weight][0])
        missing = [f"{where}.{t}" for t in recipe.stored if t not in tensors]
        if missing:
            raise _error(f"{', '.join(missing)}: missing from the checkpoint, which its config ({shipped.name}) needs")
        try:
            _check_tensor_scales(tensors)
            packed, how = recipe.convert(recipe.layout, tensors)
            m.mx_fill(weight, packed)
        except ValueError as e:
            raise _error(f"{where}: {e}") from None
        hows.add(how)
        if _static(a_scheme):
            a_scales[weight] = _input_scales(where, recipe, tensors[recipe.activation.tensor], a_scheme, rule)
    first = next(iter(a_scales.values()))[0] if a_scales else None
    m.mx_spec = MXSpec(recipe.layout.scheme, a_scheme, None, backend, first, rule)
    if a_scales and layer.candidate.kind == "experts":
        m.mx_a_scales = {w: tuple(v * (m.mx_shapes[w][0] if len(v) == 1 else 1)) for w, v in a_scales.items()}
    a_ts: Any = None
    if a_scales:
        a_ts = first if layer.candidate.kind == "linear" else a_scales
    elif a_scheme is not None and a_scheme.tensor_scale is TensorScale.AMAX:
        a_ts = "dynamic"
    record = {"role": layer.candidate.role, "kind": layer.candidate.kind, "w": recipe.layout.scheme.to_dict(),
              "weight_from": "checkpoint", "weight_multiplier": "/".join(sorted(hows)),
              "a": None if a_scheme is None else a_scheme.to_dict(),
              "a_from": "checkpoint" if activations is None else activations[1], "a_tensor_scale": a_ts}
    if a_scales:
        record["a_tensor_scale_from"] = f"{name}.{recipe.activation.tensor}"
    if rule:
        record["a_rule"] = rule
    if recipe.source:
        record["recipe"] = recipe.source
    return record


def load_shipped(pretrained: str, shipped: Shipped, *, activations: Activations, dtype: torch.dtype,
                 backend: str = "auto", gemm: str = "dequant", revision: str | None = None,
                 trust_remote_code: bool = False, device: str | torch.device | None = None,
                 device_map: Any = None) -> tuple[nn.Module, MXReport, dict[str, Any]]:
    """The model with ``shipped``'s quantized layers packed as stored, every tensor on its device (see the module
    docstring). ``activations``: None for each layer's own recipe, else ``(scheme, where it came from)`` for every
    quantized layer (``tensor_scale=static``: each layer's stored input scale). Returns the model, its report and
    a per-layer record for results files."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(pretrained, revision=revision, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    candidates, unusable = find_candidates(model)
    report = MXReport(config={"checkpoint": shipped.describe()}, skipped=[(n, "", why) for n, why in unusable])
    report.total_linear_params = sum(c.numel for c in candidates)
    files = _files(pretrained, revision)
    token = STORED_MODULES.set(_stored_modules(shipped, files))
    try:
        layers = _plan(candidates, shipped, report, activations, backend, gemm)
    finally:
        STORED_MODULES.reset(token)
    placed = _placement(model, device_map, device, dtype)
    _read(model, shipped, layers, candidates, files, dtype, placed)
    record: dict[str, Any] = {}
    for name, layer in layers.items():
        record[name] = _fill(name, layer, shipped, activations, backend)
        a = _layer_activation(layer.recipe, activations)
        report.replaced.append(LayerEntry(name, layer.candidate.role, layer.candidate.kind,
                                          layer.recipe.layout.scheme.name, a.name if a else None, layer.numel,
                                          None, layer.recipe.layout.scheme.bits()))
    _finish(model, placed)
    from ...selection.apply import count_packed_bytes

    count_packed_bytes(model, report)
    return model.eval(), report, record


def _stored_modules(shipped: Shipped, files: list[str]) -> frozenset[str]:
    """The module names the checkpoint stores tensors for (from the files' headers: no tensor is read)."""
    from safetensors import safe_open

    names = set()
    for path in files:
        with safe_open(path, framework="pt") as f:
            names |= {shipped.rename(k).rpartition(".")[0] for k in f.keys()}  # noqa: SIM118
    return frozenset(names)


def _finish(model: nn.Module, placed: dict[str, str]) -> None:
    """Tied weights, the buffers computed at construction (rotary tables) on their modules' devices, nothing left on
    meta, and accelerate's hooks when modules sit on several devices."""
    if getattr(model.config.get_text_config(), "tie_word_embeddings", False) or getattr(
            model.config, "tie_word_embeddings", False):
        model.tie_weights()
    for name, module in model.named_modules():
        for leaf, b in list(module._buffers.items()):
            if b is not None and b.device.type != "meta":
                module._buffers[leaf] = b.to(_device_of(placed, f"{name}.{leaf}" if name else leaf))
    left = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    left += [n for n, b in model.named_buffers() if b.device.type == "meta"]
    if left:
        raise _error(f"{', '.join(left[:5])}{' ...' if len(left) > 5 else ''}: missing from the checkpoint")
    if len(set(placed.values())) > 1:
        from accelerate import dispatch_model

        dispatch_model(model, device_map=placed)


def _set(model: nn.Module, key: str, t: torch.Tensor) -> None:
    module_name, _, leaf = key.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(t, requires_grad=False)
    else:
        module._buffers[leaf] = t


def _check_tensor_scales(tensors: dict[str, torch.Tensor]) -> None:
    """A stored per-tensor weight scale that is not finite and positive would flip or zero the weights: refused,
    named (every format's, before its conversion)."""
    for key in ("weight_global_scale", "weight_scale_2"):
        t = tensors.get(key)
        if t is not None and t.is_floating_point() and not bool((torch.isfinite(t) & (t > 0)).all()):
            raise ValueError(f"{key} = {t.flatten()[:4].tolist()} is not a usable scale (it must be finite and > 0)")

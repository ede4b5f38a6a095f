"""Packed MX weights through transformers' quantizer API: quantized while the checkpoint loads.

``from_pretrained(path, quantization_config=MXQuantizationConfig(w_format="fp4_e2m1", roles="mlp"))``
builds the model on the meta device, turns the selected layers into packed MX
layers (:func:`lm_eval_mx.nn.layers.convert_packed`), then packs each checkpoint
tensor the moment the loader reads it, on the device it is loaded to: the
high-precision model is never held in memory, only one tensor at a time.
``device_map="auto"`` plans with the packed sizes. ``hf-mx`` does all this for
``packed=True``.

The config and quantizer are registered with transformers under ``quant_method="mx"``
when this module is imported (``from lm_eval_mx import MXQuantizationConfig`` and hf-mx's
``packed=True`` import it).
"""

from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
import transformers
from packaging.version import Version

try:
    from transformers.core_model_loading import ConversionOps
except ImportError as e:  # transformers 4
    raise ImportError("packed MX weights (packed=True) need transformers 5") from e
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..nn.layers import MXPackedLayer, mx_layers
from ..numerics.packing import packed_layout
from ..selection.apply import convert_layers, count_packed_bytes, enable_attention
from ..selection.config import MXConfig, parse_mx_args
from ..selection.report import MXReport

# The loading API used here (ConversionOps, get_quantize_ops, param_element_size) changes within
# transformers 5; tested with 5.17 and 5.24.
MIN_TRANSFORMERS = "5.17"
if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
    raise ImportError(
        f"packed MX weights (packed=True) need transformers>={MIN_TRANSFORMERS}, found {transformers.__version__}; "
        "fake quantization (packed=False) works with the installed version"
    )

QUANT_METHOD = "mx"


@register_quantization_config(QUANT_METHOD)
class MXQuantizationConfig(QuantizationConfigMixin):
    """Which layers to store as packed MX, in which formats: the MX keys of ``hf-mx``.

    ``MXQuantizationConfig(w_format="fp4_e2m1", a_format="fp8_e4m3", roles="mlp")``,
    or ``MXQuantizationConfig(MXConfig(...))``; ``packed`` is always on here.
    """

    def __init__(self, mx: MXConfig | dict[str, Any] | None = None, origin: dict[str, Any] | None = None,
                 **kwargs: Any) -> None:
        if kwargs.pop("quant_method", None) is not None and not isinstance(mx, (dict, MXConfig)):  # a config.json's
            raise ValueError("packed MX checkpoint: config.json's quantization_config (quant_method mx) has no 'mx' "
                             f"object (got {mx!r}), which records how the codes were made: the config was edited; "
                             "restore the one lm-eval-mx wrote")
        if mx is not None and kwargs:
            raise ValueError(f"MXQuantizationConfig: give an MXConfig (or its dict) or keys, not both (got {sorted(kwargs)})")
        if isinstance(mx, dict):  # MXConfig.to_dict(), as from_dict() gives it back
            unknown = sorted(set(mx) - {f.name for f in fields(MXConfig)})
            if unknown:
                raise ValueError(f"MXQuantizationConfig: {unknown} are not MXConfig fields")
            config = _from_dict(mx)
        elif isinstance(mx, MXConfig):
            config = mx
        else:
            config, rest = parse_mx_args({**kwargs, "packed": True})
            if rest:
                raise ValueError(f"MXQuantizationConfig: unknown keys {sorted(rest)}; valid: the MX keys of hf-mx "
                                 "(w_format, a_format, roles, include, exclude, ...)")
        self.quant_method = QUANT_METHOD
        # with the keys the user gave: the checks of settings a model's layers leave unused need them
        self.mx = {**MXConfig(**{**config.to_dict(), "packed": True}).to_dict(), "given": sorted(config.given),
                   "named": {k: list(v) for k, v in config.named.items()}}
        # how a saved checkpoint's codes were made (lm-eval-mx quantize: method, options, calibration); None when
        # they are packed while loading
        self.origin = origin

    @property
    def mx_config(self) -> MXConfig:
        return _from_dict(self.mx)


def _from_dict(mx: dict[str, Any]) -> MXConfig:
    """MXConfig from its dict (``given`` and ``named`` serialized as lists)."""
    named = {k: tuple(v) for k, v in (mx.get("named") or {}).items()}
    return MXConfig(**{**mx, "given": frozenset(mx.get("given", ())), "named": named})


class MXPack(ConversionOps):
    """The load-time op: a checkpoint tensor of a packed layer becomes its codes and scales."""

    def __init__(self, hf_quantizer: MXHfQuantizer) -> None:
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: dict[str, Any], *args: Any, model: Any = None, **kwargs: Any) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for key, value in input_dict.items():
            tensor = value[0] if isinstance(value, list) else value
            module_name, _, name = key.rpartition(".")
            module = model.get_submodule(module_name)
            with torch.no_grad():
                packed = module.mx_pack(name, tensor)
            out.update({f"{module_name}.{k}": v for k, v in packed.items()})
        return out


_SAFETENSORS_DTYPES = {torch.uint8: "U8", torch.float32: "F32"}


def stored_tensor_headers(files: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """(shape, safetensors dtype) of every tensor of a checkpoint's safetensors ``files``, read from their headers
    (no tensor data is read)."""
    from safetensors import safe_open

    out = {}
    for path in files:
        if str(path).endswith(".safetensors"):
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    s = f.get_slice(key)
                    out[key] = (tuple(s.get_shape()), s.get_dtype())
    return out


def stored_tensor_names(pretrained: str) -> list[str]:
    """The tensor names of a local checkpoint directory's safetensors files ([] for a hub id or no such files)."""
    root = Path(str(pretrained))
    index = root / "model.safetensors.index.json"
    if index.is_file():
        return sorted(json.loads(index.read_text()).get("weight_map", {}))
    return sorted(stored_tensor_headers([root / "model.safetensors"])) if (root / "model.safetensors").is_file() else []


def check_stored_tensors(model: torch.nn.Module, headers: dict[str, tuple[tuple[int, ...], str]]) -> None:
    """A packed MX checkpoint's tensors against what its quantization_config makes of the model, before any is
    loaded: each packed layer's codes, scales and tensor scale of the right shape and dtype, and no packed tensor
    for a layer the config leaves in high precision. The error names the tensor (transformers' names none)."""
    edited = "the checkpoint's config.json and tensors disagree (was its quantization_config edited?); nothing was " \
             "evaluated"
    packed = {n: m for n, m in mx_layers(model) if isinstance(m, MXPackedLayer)}
    for name, m in packed.items():
        for leaf, (shape, dtype) in m.mx_stored().items():
            got = headers.get(f"{name}.{leaf}")
            if got is not None and got != (shape, _SAFETENSORS_DTYPES[dtype]):
                raise ValueError(f"packed MX checkpoint: {name}.{leaf} is stored as {got[1]} {list(got[0])}, its "
                                 f"config ({m.mx_spec.w.name}) makes it {_SAFETENSORS_DTYPES[dtype]} {list(shape)}: "
                                 f"{edited}")
    for key in headers:
        module_name, _, leaf = key.rpartition(".")
        if not leaf.endswith(("_scales", "_tensor_scale")) or module_name in packed:
            continue
        try:
            model.get_submodule(module_name)
        except AttributeError:  # a name the loader renames (e.g. per-expert tensors of fused experts)
            continue
        raise ValueError(f"packed MX checkpoint: {key} holds packed scales of {module_name}, which its config does "
                         f"not select: {edited}")


def _packed_param(model: torch.nn.Module, param_name: str) -> tuple[MXPackedLayer, str] | None:
    module_name, _, name = param_name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return None
    if isinstance(module, MXPackedLayer) and name in module.mx_prequantized:
        return module, name
    return None


@register_quantizer(QUANT_METHOD)
class MXHfQuantizer(HfQuantizer):
    """Packs the selected layers' weights as they load; records an ``MXReport`` as ``mx_report``."""

    requires_calibration = False
    quantization_config: MXQuantizationConfig

    def __init__(self, quantization_config: MXQuantizationConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.mx_report: MXReport | None = None

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("packed MX weights cannot be offloaded to disk; give the model GPU or CPU memory")

    def param_needs_quantization(self, model: Any, param_name: str, **kwargs: Any) -> bool:
        """Packed layers' weights, unless the checkpoint stores them packed (then they load as they are, and a
        stored tensor of the wrong shape is one of transformers' size-mismatch errors)."""
        return not self.pre_quantized and _packed_param(model, param_name) is not None

    def param_element_size(self, model: Any, param_name: str, param: torch.Tensor) -> float:
        """Bytes per element once packed, so ``device_map="auto"`` plans with the packed size."""
        found = _packed_param(model, param_name)
        if found is None or self.pre_quantized:
            return param.element_size()
        module, name = found
        codes_shape = packed_layout(module.mx_shapes[name], module.mx_spec.w.elem, module.mx_spec.w.block_size)[0]
        return math.prod(codes_shape) / param.numel()  # the scales are their own uint8 parameter

    def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        config = self.quantization_config.mx_config
        self.mx_report = convert_layers(model, config)
        text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        if getattr(text, "tie_word_embeddings", False) and any(e.role == "lm_head" for e in self.mx_report.replaced):
            raise ValueError(
                "packed=True selects lm_head, but this model ties lm_head to the input embeddings "
                "(tie_word_embeddings=True), so the checkpoint holds that weight once, as the embeddings, which "
                "stay in high precision; there is no separate lm_head weight to pack. Leave lm_head out, or use "
                "fake quantization (packed=False), which gives lm_head its own MX copy"
            )
        if self.pre_quantized:  # the checkpoint holds codes, scales and tensor scales: load them as stored
            for _, m in mx_layers(model):
                if isinstance(m, MXPackedLayer):
                    m.mx_expect_codes()
            check_stored_tensors(model, stored_tensor_headers(kwargs.get("checkpoint_files") or ()))
        enable_attention(model, config, self.mx_report)  # refuses unsupported attention before the weights load
        return model

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        if self.pre_quantized:
            # the loader flags every tensor it read; a missing one was only allocated
            missing = [f"{n}.{k}" for n, m in mx_layers(model) if isinstance(m, MXPackedLayer) for k in m.mx_stored()
                       if not getattr(getattr(m, k), "_is_hf_initialized", False)]
            if missing:
                raise ValueError(f"packed MX checkpoint: {len(missing)} tensors that its quantization_config needs are "
                                 f"missing (e.g. {', '.join(missing[:3])}); nothing was evaluated")
        unpacked = [f"{n}.{w}" for n, m in mx_layers(model) if isinstance(m, MXPackedLayer)
                    for w in m.mx_prequantized if getattr(m, w).dtype != torch.uint8]
        if unpacked:
            raise ValueError(
                f"packed=True: {len(unpacked)} selected weights (e.g. {unpacked[0]}) were not in the checkpoint, so "
                "they could not be packed; exclude those layers (exclude=...) or load a complete checkpoint"
            )
        assert self.mx_report is not None
        count_packed_bytes(model, self.mx_report)
        return model

    def get_quantize_ops(self) -> MXPack:
        return MXPack(self)

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        """``save_pretrained`` writes the codes, scales and tensor scales; loading the directory reads them back
        as they are (pre-quantized), never re-rounding."""
        return True

    @property
    def is_trainable(self) -> bool:
        return False

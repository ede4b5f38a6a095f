"""``hf-mx``: lm-eval's ``hf`` model with selected matmuls in MX. A thin layer over ``HFLM``.

MX keys are taken out of ``model_args`` before ``HFLM`` sees them, validated
first (before any model load), and MX is applied once the model is loaded,
tied and placed, so dtype, device_map, parallelize, GGUF and PEFT keep working.
With ``packed=True`` the weights are instead packed while they load, through
transformers' quantizer API (:mod:`lm_eval_mx.hf.quantizer`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import logging
import math
import sys
from collections import Counter
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..kernels.backends import BACKENDS, resolve_backend
from ..nn.attention import NAME as ATTENTION_NAME
from ..nn.layers import mx_disabled, mx_layers, remove_mx
from ..numerics.formats import suggest
from ..selection.apply import apply_mx
from ..selection.config import (
    BESIDE_CHECKPOINT,
    MX_KEYS,
    SCHEME_KEYS,
    MXConfig,
    _as_bool,
    parse_mx_args,
    refused_beside_checkpoint,
)
from ..selection.report import MXReport

log = logging.getLogger("lm_eval_mx")

# from_pretrained keyword arguments that HFLM forwards untouched (**kwargs).
FROM_PRETRAINED_KEYS = frozenset({
    "device_map", "attn_implementation", "experts_implementation", "low_cpu_mem_usage", "load_in_8bit",
    "load_in_4bit", "bnb_4bit_compute_dtype", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant",
    "quantization_config", "cache_dir", "local_files_only", "token", "use_safetensors", "variant",
    "offload_state_dict", "max_memory", "torch_dtype", "force_download", "key_mapping", "tp_size",
    "use_kernels", "code_revision",
})
EXTRA_KEYS = ("mx_keep_original",)


HFLM_KEYS = frozenset(
    k for k, p in inspect.signature(HFLM.__init__).parameters.items() if k != "self" and p.kind is not p.VAR_KEYWORD
)


def check_model_args(args: dict[str, Any]) -> None:
    """Reject keys that are neither MX keys, HFLM arguments nor from_pretrained/config keys."""
    allowed = HFLM_KEYS | FROM_PRETRAINED_KEYS | set(MX_KEYS) | set(EXTRA_KEYS)
    unknown = [k for k in args if k not in allowed]
    if not unknown:
        return
    config_keys = _config_keys(args, unknown)
    unknown = [k for k in unknown if k not in config_keys]
    if unknown:
        pool = sorted(allowed)
        hints = "; ".join(f"{k!r}{suggest(k, pool)}" for k in unknown)
        raise ValueError(
            f"hf-mx: unknown model_args {hints}. MX keys: {', '.join(MX_KEYS)}, {', '.join(EXTRA_KEYS)}. "
            f"Model keys: the arguments of lm-eval's hf model ({', '.join(sorted(HFLM_KEYS))}), "
            f"from_pretrained options ({', '.join(sorted(FROM_PRETRAINED_KEYS))}) and attributes of the model config."
        )


def _read_config(args: dict[str, Any]) -> Any:
    """The model's config, read the way HFLM will (same revision, subfolder, GGUF file); remote code runs only
    when ``trust_remote_code`` is really true."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(
        args["pretrained"],
        trust_remote_code=_as_bool("trust_remote_code", args.get("trust_remote_code", False)),
        gguf_file=args.get("gguf_file"),
        subfolder=str(args.get("subfolder", "") or ""),
        revision=str(args.get("revision", "main")),
    )


def _config_keys(args: dict[str, Any], unknown: list[str]) -> set[str]:
    """Attributes of the model's config (transformers accepts them as overrides).

    A config that cannot be read is an error naming the cause, not a silent "unknown key".
    """
    if not isinstance(args.get("pretrained"), str):
        return set()
    try:
        cfg = _read_config(args)
    except Exception as e:  # any reason the config is unreadable: report it with the keys it blocks
        raise ValueError(
            f"hf-mx: model_args {', '.join(map(repr, unknown))} are neither MX nor hf arguments, and could be "
            f"attributes of the model config, but the config of {args['pretrained']!r} could not be read to check: "
            f"{type(e).__name__}: {e}"
        ) from e
    return set(cfg.to_dict())


def mx_cache_tag(config: MXConfig, report: MXReport) -> str | None:
    """Cache-file suffix for this MX configuration (None when nothing is in MX)."""
    if not report.replaced and not report.attn_bmm:
        return None
    blob = json.dumps(config.to_dict(), sort_keys=True).encode()
    return "mx-" + hashlib.sha1(blob).hexdigest()[:12]


def _patch_caching_lm() -> None:
    """lm-eval keys its request cache without model args: give MX runs their own cache file."""
    from lm_eval.api import model as api

    original = api.CachingLM.__init__
    if getattr(original, "_lm_eval_mx", False):
        return

    @functools.wraps(original)
    def __init__(self: Any, lm: Any, cache_db: str) -> None:
        tag = getattr(lm, "mx_cache_tag", None)
        if tag:
            cache_db = f"{cache_db.removesuffix('.db')}_{tag}.db"
        original(self, lm, cache_db)

    __init__._lm_eval_mx = True  # type: ignore[attr-defined]
    api.CachingLM.__init__ = __init__  # type: ignore[method-assign]


_patch_caching_lm()


def _quant_method(config: Any) -> str:
    method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)
    return str(getattr(method, "value", method))


def detect_checkpoint(args: dict[str, Any]) -> tuple[Any, Any]:
    """What a checkpoint stores, read from its config before loading, in one place: ``(MXQuantizationConfig, None)``
    for packed MX weights (``lm-eval-mx quantize``, or ``save_pretrained`` of a ``packed=True`` model),
    ``(None, Shipped)`` for a format of another tool that hf-mx reads as stored (:mod:`lm_eval_mx.hf.checkpoints`),
    ``(None, None)`` for an unquantized one. Any other quantization_config raises, naming the supported formats.
    A config that cannot be read here is left for HFLM to report."""
    if not isinstance(args.get("pretrained"), str):
        return None, None
    try:
        cfg = _read_config(args)
    except Exception:  # HFLM reads it again and reports why it cannot
        if not args.get("gguf_file"):
            return None, None
        try:  # a gguf_file beside a quantized checkpoint is refused by name, not by transformers' GGUF reader
            cfg = _read_config({**args, "gguf_file": None})
        except Exception:
            return None, None
    stored = getattr(cfg, "quantization_config", None)
    if stored is None:
        _check_no_packed_tensors(args["pretrained"])
    if _quant_method(stored) == "mx":
        from .quantizer import MXQuantizationConfig  # registers quant_method="mx" with transformers

        mx = stored if isinstance(stored, MXQuantizationConfig) else MXQuantizationConfig.from_dict(dict(stored))
        return mx, None
    from .checkpoints import read_quant_config, recognise

    return None, recognise(read_quant_config(args["pretrained"], cfg))


def _checkpoint_profile(pretrained: str, shipped: Any, given: MXConfig) -> MXConfig:
    """``given`` as the profile's stack runs this shipped checkpoint (its activation recipe kept, or dropped:
    ``weight_only``); ``ValueError`` with the stack's reason where it refuses the checkpoint, or for keys that
    would set the activations beside the profile."""
    from ..numerics.profiles import ProfileRefusal
    from ..selection.profile import checkpoint_activations

    clash = sorted(given.given & {"format", "w_format", "a_format", "weight_only"})
    if clash:
        raise ValueError(f"hf-mx: profile={given.profile} with {pretrained} ({shipped.name}) takes the formats from "
                         f"the checkpoint and the activation rule from the profile; drop {', '.join(clash)}")
    try:  # every recipe of the checkpoint (a mixed recipe has several): the stack runs or refuses each
        dropped = {checkpoint_activations(given.profile, r.layout.name,
                                          None if r.activation.kind == "none" else r.activation.kind)[1]
                   for r in shipped.recipes}
    except ProfileRefusal as e:
        raise ProfileRefusal(f"hf-mx: {pretrained} ({shipped.name}): {e}") from None
    if len(dropped) > 1:
        raise ProfileRefusal(f"hf-mx: {pretrained} ({shipped.name}): profile={given.profile} would drop the activation "
                             "quantization of some of its recipes and keep it in others; evaluate it without a profile")
    if not dropped.pop():
        return given
    return dataclasses.replace(given, weight_only=True, given=given.given | {"weight_only"})


def _check_no_packed_tensors(pretrained: str) -> None:
    """A local checkpoint whose tensors are packed MX codes (``*_scales``) but whose config.json lost its
    quantization_config would load as garbage or fail in transformers naming no tensor: refused, named."""
    from .quantizer import stored_tensor_names

    names = stored_tensor_names(pretrained)
    present = set(names)
    packed = [k for k in names if k.endswith("_scales") and k.removesuffix("_scales") in present]  # NAME, NAME_scales
    if packed:
        raise ValueError(f"hf-mx: {pretrained} holds packed MX tensors (e.g. {packed[0]}) but its config.json has no "
                         "quantization_config (quant_method mx): the config was edited; restore the one lm-eval-mx "
                         "wrote")


def _check_packed_args(pretrained: Any, keep_original: bool, args: dict[str, Any], what: str = "packed=True") -> None:
    """packed=True (or a checkpoint of packed MX weights): refuse, before loading, the options it cannot honour."""
    if not isinstance(pretrained, str):
        raise ValueError("packed=True quantizes while loading: pretrained must be a path or hub id, not a model object")
    if keep_original:
        how = ("run them without packed=True" if what == "packed=True" else
               "compare a checkpoint with `lm-eval-mx compare --checkpoint DIR`")
        raise ValueError(f"{what} holds only quantized codes; mx_keep_original needs the high-precision weights "
                         f"(compare and divergence switch MX off with it: {how})")
    clashes = {
        "gguf_file": "GGUF files load through transformers' own GGUF quantizer",
        "quantization_config": "the packed MX config is the model's quantization config",
        "load_in_8bit": "bitsandbytes and packed MX both quantize the same weights",
        "load_in_4bit": "bitsandbytes and packed MX both quantize the same weights",
        "peft": "adapters cannot be merged into packed weights",
        "delta": "delta weights cannot be added to packed weights",
        "autogptq": "GPTQ checkpoints are already quantized",
        "gptqmodel": "GPTQ checkpoints are already quantized",
    }
    for key, why in clashes.items():
        if args.get(key) not in (None, False, "", "False", "false"):
            raise ValueError(f"{what} cannot be combined with {key}: {why}")


# lm-eval hf's own ``backend`` key (the model class), not the MX engine (``mx_backend``).
HF_BACKENDS = ("default", "causal", "seq2seq")


def check_hf_args(config: MXConfig, rest: dict[str, Any]) -> None:
    """MX settings that the hf arguments would contradict or leave without effect: refused before loading."""
    if "backend" in rest and str(rest["backend"]).strip().lower() not in HF_BACKENDS:
        raise ValueError(
            f"backend={rest['backend']}: backend is lm-eval hf's own key ({', '.join(HF_BACKENDS)}); the MX "
            f"quantization engine is mx_backend ({', '.join(BACKENDS)})"
        )
    backend = resolve_backend(config.mx_backend)  # e.g. mx_backend=triton without CUDA
    if config.attn_bmm and rest.get("attn_implementation") not in (None, ATTENTION_NAME):
        raise ValueError(
            f"attn_bmm=True runs attention through hf-mx's '{ATTENTION_NAME}' function, which would override "
            f"attn_implementation={rest['attn_implementation']}; drop one of them"
        )
    if config.packed_gemm == "fused":
        device = str(rest.get("device") or "")
        if backend != "triton" or device.startswith("cpu"):
            raise ValueError("packed_gemm=fused is a Triton GEMM for CUDA: it needs a CUDA device and the Triton "
                             f"backend (here: mx_backend={config.mx_backend} -> {backend}, device={device or 'default'}); "
                             "use packed_gemm=dequant")


def show_report(config: MXConfig, report: MXReport) -> None:
    """The replacement report, where the user sees it: printed to stderr (as lm-eval's own progress and tables
    reach the terminal; nothing configures the ``lm_eval_mx`` logger, and a logger at INFO would be silent under
    ``simple_evaluate``), and logged at DEBUG for whoever collects logs."""
    text = f"hf-mx: MX configuration: {config.label()}\n{report.table()}" if config.enabled else \
        "hf-mx: MX off (roles=none): the model runs as lm-eval's hf\n"
    print(text, file=sys.stderr, end="" if text.endswith("\n") else "\n", flush=True)
    log.debug("%s", text)


def gguf_dequantize_config() -> Any:
    """What asks transformers to unpack a GGUF file into dense weights: MX quantizes ``nn.Linear`` weights, and
    transformers >= 5.24 with the ``kernels`` package keeps a GGUF's quantized weights packed (``GgufLinear``), which
    no MX layer can read. None where the installed transformers always dequantizes (no ``GgufConfig.dequantize``)."""
    try:
        from transformers import GgufConfig  # type: ignore[attr-defined]
    except ImportError:
        return None
    if "dequantize" not in inspect.signature(GgufConfig.__init__).parameters:
        return None
    return GgufConfig(dequantize=True)


def _count_nonfinite(requests: list[Any], results: list[Any]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for req, res in zip(requests, results):
        value = res[0] if isinstance(res, tuple) else res
        if isinstance(value, float) and not math.isfinite(value):
            counts[getattr(req, "task_name", None) or "?"] += 1
    return counts


@register_model("hf-mx")
class HFMXLM(HFLM):
    """lm-eval ``hf`` with MX fake quantization of selected linear layers.

    All ``hf`` model_args work; MX keys are documented in docs/model_args.md
    (``w_format``, ``a_format``, ``format``, ``block_size``, ``rounding``,
    ``scale_bits``, ``scale_mode``, ``roles``/``mlp_only``/``attn_only``,
    ``include``, ``exclude``, ``role_formats``, ``layer_formats``, ``recipe``, ``weight_only``,
    ``attn_bmm``, ``bmm_format``, ``scale_format``, ``tensor_scale``, ``rotation``, ``rotation_*``,
    ``mx_backend``, ``packed``, ``packed_gemm``). ``backend`` is hf's own (causal/seq2seq).
    """

    def __init__(self, pretrained: Any = None, **kwargs: Any) -> None:
        config, rest = self._prepare(pretrained, kwargs)
        super().__init__(pretrained=pretrained, **rest)
        if self.mx_stored is not None:
            for _, m in mx_layers(self._model):  # the run-time keys given beside the checkpoint
                m.mx_spec = dataclasses.replace(m.mx_spec, backend=config.mx_backend)
                m.mx_gemm = config.packed_gemm
        if self.mx_shipped is not None:
            self._mx_record(config, self._shipped_report)
            blob = json.dumps([config.to_dict(), self.mx_shipped.describe(), self._shipped_layers], sort_keys=True,
                              default=str).encode()
            self.mx_cache_tag = "mx-" + hashlib.sha1(blob).hexdigest()[:12]
        elif config.packed:
            self._mx_record(config, self._model.hf_quantizer.mx_report)
        else:
            self.set_mx(config)

    @classmethod
    def check_before_loading(cls, pretrained: Any = None, **kwargs: Any) -> None:
        """Every check ``HFMXLM(pretrained, **kwargs)`` makes before it loads the model, without loading it
        (``compare`` runs it for each ``--checkpoint`` before the baseline's evaluation)."""
        cls.__new__(cls)._prepare(pretrained, kwargs)

    def _prepare(self, pretrained: Any, kwargs: dict[str, Any]) -> tuple[MXConfig, dict[str, Any]]:
        """The checks and settings before the model loads: (the MX configuration, HFLM's arguments)."""
        if pretrained is None:
            raise ValueError("hf-mx needs pretrained=<model path or hub id>")
        check_model_args({"pretrained": pretrained, **kwargs})
        self.mx_stored, self.mx_shipped = detect_checkpoint({"pretrained": pretrained, **kwargs})
        quantized = self.mx_stored is not None or self.mx_shipped is not None
        if quantized and "packed_gemm" in kwargs and "packed" not in kwargs:  # the checkpoint's weights are packed
            config, rest = parse_mx_args({**kwargs, "packed": True})
            config = dataclasses.replace(config, given=config.given - {"packed"})
        else:
            config, rest = parse_mx_args(kwargs)
        check_hf_args(config, rest)
        self.mx_keep_original = _as_bool("mx_keep_original", rest.pop("mx_keep_original", False))
        self._mx_packed = None
        if self.mx_shipped is not None:  # another tool's quantized weights, as stored
            _check_packed_args(pretrained, self.mx_keep_original, rest, f"{pretrained} ({self.mx_shipped.name})")
            placed = [k for k in ("parallelize", "tp_plan") if rest.get(k) not in (None, False, "False", "false", "")]
            if placed:
                raise ValueError(f"hf-mx: {pretrained} ({self.mx_shipped.name}) loads tensor by tensor onto `device` or "
                                 f"the modules' devices of `device_map`; {', '.join(placed)} is not supported for such "
                                 "checkpoints yet")
            config = self._shipped_config(pretrained, config)
            check_hf_args(config, rest)
        elif self.mx_stored is not None:  # the checkpoint's codes run as stored, with its recorded configuration
            config = self._stored_config(pretrained, config)
            _check_packed_args(pretrained, self.mx_keep_original, rest, f"{pretrained} (packed MX weights)")
            check_hf_args(config, rest)
        elif config.profile_pending:
            raise ValueError(f"hf-mx: profile={config.profile} needs the format it runs on a high-precision model: "
                             "format=mxfp8, mxfp4 or nvfp4 (or w_format=mxfp4,a_format=mxfp8)")
        elif config.packed:
            _check_packed_args(pretrained, self.mx_keep_original, rest)
            from .quantizer import MXQuantizationConfig

            self._mx_packed = MXQuantizationConfig(config)
        return config, rest

    def _shipped_config(self, pretrained: str, given: MXConfig) -> MXConfig:
        """The activation scheme and run-time keys beside a shipped checkpoint (the weights are its own); what
        would re-quantize or reinterpret the stored weights is refused before loading."""
        shipped = self.mx_shipped
        clash = refused_beside_checkpoint("shipped", given.given)
        if clash:
            rot = [k for k in clash if k.startswith("rotation")]
            why = ("its stored weights are not rotated, so inputs cannot be rotated to match" if rot else
                   "they would re-quantize or reinterpret the stored weights")
            raise ValueError(
                f"hf-mx: {pretrained} is a {shipped.name} checkpoint, evaluated with its weights as stored; "
                f"{', '.join(clash)}: {why}. Beside it only {', '.join(sorted(BESIDE_CHECKPOINT['shipped']))} "
                f"(and, with a_format, {', '.join(SCHEME_KEYS)} for the activation scheme) may be given"
            )
        by_profile = False
        if given.profile is not None:
            asked = "weight_only" in given.given
            given = _checkpoint_profile(pretrained, shipped, given)
            by_profile = given.weight_only and not asked
        if "weight_only" in given.given and "a_format" in given.given and given.weight_only:
            raise ValueError("hf-mx: weight_only=True and a_format contradict each other; give one")
        if "weight_only" in given.given and not given.weight_only and shipped.weight_only \
                and "a_format" not in given.given:
            raise ValueError(f"hf-mx: {pretrained} is weight-only ({shipped.name}): weight_only=False needs an "
                             "a_format for the activations")
        if given.weight_only:
            a_scheme, a_from = None, (f"profile={given.profile} (the stack drops the checkpoint's activation "
                                      "quantization)" if by_profile else "model_args (weight_only=True)")
        elif "a_format" in given.given:
            a_scheme, a_from = given.scheme(given.a_format), "model_args (a_format)"
        else:
            a_scheme, a_from = shipped.default_activation(), "checkpoint"
        self._shipped_act = (a_scheme, a_from)  # the label's; each layer loads its own recipe when from the checkpoint
        self._shipped_backend, self._shipped_gemm = given.mx_backend, given.packed_gemm
        w = "nvfp4" if shipped.weight_scheme.block_size == 16 else shipped.weight_scheme.elem.name
        # a summary (the report and each layer's record say what each layer runs): with per-layer activation
        # recipes (mixed, default_activation None) it is not weight-only
        per_layer = self._per_layer_activations()
        keys = dict(w_format=w, a_format=given.a_format if "a_format" in given.given else
                    (a_scheme.elem.name if a_scheme is not None and a_scheme.block_size != 16 else w),
                    weight_only=a_scheme is None and not per_layer, mx_backend=given.mx_backend, packed=True,
                    packed_gemm=given.packed_gemm, profile=given.profile)
        if "a_format" in given.given:
            keys.update({k: getattr(given, k) for k in SCHEME_KEYS if k in given.given})
        if w != "nvfp4" and "scale_mode" not in keys:
            keys["scale_mode"] = shipped.weight_scheme.scale_mode.value
        return MXConfig(**keys, given=given.given)

    def _per_layer_activations(self) -> bool:
        """Whether a shipped checkpoint's layers run their own activation recipes (a mixed recipe, as stored), so
        that no single activation scheme describes the model."""
        a_scheme, a_from = self._shipped_act
        return a_scheme is None and a_from == "checkpoint" and not self.mx_shipped.weight_only

    def _stored_config(self, pretrained: str, given: MXConfig) -> MXConfig:
        """The checkpoint's MX configuration, with the run-time keys given beside it; any other MX key would
        re-quantize or reinterpret the stored weights: refused before loading."""
        stored = self.mx_stored.mx_config
        clash = refused_beside_checkpoint("stored", given.given)
        if clash:
            raise ValueError(
                f"hf-mx: {pretrained} stores packed MX weights ({stored.label()}), evaluated as stored with the "
                f"configuration it records; {', '.join(clash)} would change them. Beside such a checkpoint only "
                f"{', '.join(sorted(BESIDE_CHECKPOINT['stored']))} may be given"
            )
        keep = {k: getattr(given, k) for k in BESIDE_CHECKPOINT["stored"] if k in given.given}
        return dataclasses.replace(stored, **keep, given=stored.given | frozenset(keep))

    def _create_model(self, *args: Any, quantization_config: Any = None, **kwargs: Any) -> None:
        """HFLM's model creation, given the packed-MX quantization config when ``packed=True``."""
        if self.mx_shipped is not None:
            self._create_shipped(*args, **kwargs)
            return
        if self._mx_packed is not None:
            if quantization_config is not None:
                raise ValueError(
                    f"packed=True: this checkpoint is already quantized ({_quant_method(quantization_config)}); "
                    "packed MX weights need a high-precision checkpoint"
                )
            quantization_config = self._mx_packed
        elif kwargs.get("gguf_file") and quantization_config is None:
            quantization_config = gguf_dequantize_config()
        super()._create_model(*args, quantization_config=quantization_config, **kwargs)

    def _get_config(self, *args: Any, **kwargs: Any) -> None:
        """HFLM's config; a shipped checkpoint's quantization_config is kept aside (``mx_shipped`` describes it),
        since transformers has no quantizer for some of these formats and hf-mx loads their weights itself."""
        super()._get_config(*args, **kwargs)
        if getattr(self, "mx_shipped", None) is not None and hasattr(self._config, "quantization_config"):
            del self._config.quantization_config

    def _create_shipped(self, pretrained: str, revision: str | None = "main", dtype: Any = "auto",
                        trust_remote_code: bool | None = False, **kwargs: Any) -> None:
        """The model of a shipped checkpoint, its quantized layers packed as stored (:mod:`.checkpoints`)."""
        from .checkpoints import load_shipped

        if dtype in (None, "auto"):
            dtype = getattr(self._config, "dtype", None) or getattr(self._config, "torch_dtype", None) or torch.bfloat16
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        a_scheme, a_from = self._shipped_act
        self._model, self._shipped_report, self._shipped_layers = load_shipped(
            pretrained, self.mx_shipped, activations=None if a_from == "checkpoint" else (a_scheme, a_from), dtype=dtype,
            backend=self._shipped_backend, gemm=self._shipped_gemm, revision=revision,
            trust_remote_code=bool(trust_remote_code), device=self.device, device_map=kwargs.get("device_map"))

    def set_mx(self, config: MXConfig) -> MXReport:
        """(Re)apply MX with ``config``; earlier MX layers are removed first (needs mx_keep_original)."""
        if self._mx_packed is not None or config.packed:
            raise ValueError(
                "packed MX weights are quantized while the model loads, for one configuration: load a model "
                "per packed configuration (set_mx swaps configurations on high-precision weights)"
            )
        if getattr(self, "mx_report", None) is not None:
            remove_mx(self._model)
        return self._mx_record(
            config, apply_mx(self._model, config, keep_original=self.mx_keep_original, progress=self.rank == 0)
        )

    def _mx_record(self, config: MXConfig, report: MXReport) -> MXReport:
        self.mx_config = config
        self.mx_report = report
        self.mx_cache_tag = mx_cache_tag(config, self.mx_report)
        self.mx_nonfinite: Counter[str] = Counter()
        if self.rank == 0:
            show_report(config, self.mx_report)
        return self.mx_report

    def _check(self, requests: list[Any], results: list[Any], what: str) -> None:
        counts = _count_nonfinite(requests, results)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, dict(counts))
            counts = sum((Counter(g) for g in gathered), Counter())
        if counts:
            self.mx_nonfinite.update(counts)
            if self.rank == 0:
                per_task = ", ".join(f"{t}: {n}" for t, n in sorted(counts.items()))
                log.warning(
                    "MX produced non-finite %s for %d requests (%s): an inf/NaN or a scale past E8M0's "
                    "range turned blocks into NaN; those requests' scores are not meaningful",
                    what, sum(counts.values()), per_task,
                )

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        results = super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        self._check(requests, results, "loglikelihoods")
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        results = super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
        self._check(requests, results, "rolling loglikelihoods")
        return results

    def mx_off(self) -> Any:
        """Context manager: evaluate this model with MX switched off (needs mx_keep_original=True)."""
        return mx_disabled(self._model)

    def get_model_info(self) -> dict[str, Any]:
        info = super().get_model_info()
        info["mx_config"] = self.mx_config.to_dict()
        info["mx_label"] = self.mx_config.label()
        info["mx_schemes"] = {n: self.mx_config.scheme(n).to_dict() for n in self.mx_config.formats_in_use()}
        info["mx_report"] = self.mx_report.summary()
        info["mx_nonfinite_requests"] = dict(self.mx_nonfinite)
        if self.mx_stored is not None:
            info["mx_checkpoint"] = {"format": "packed MX (quant_method=mx)", "origin": self.mx_stored.origin}
        if self.mx_shipped is not None:  # the weights are the checkpoint's and the activations its recipe's
            a_scheme, a_from = self._shipped_act
            a_name = "per layer" if self._per_layer_activations() else a_scheme.name if a_scheme else None
            info["mx_label"] = f"{self.mx_shipped.name}: a={a_name or 'none'}"
            info["mx_schemes"] = {"weights": self.mx_shipped.weight_scheme.to_dict(),
                                  "activations": a_scheme.to_dict() if a_scheme else None}
            info["mx_checkpoint"] = {
                **self.mx_shipped.describe(),
                "settings": {"weights": "checkpoint (as stored)",
                             "activations": a_name or "none (weight only)",
                             "activations_from": a_from,
                             **{k: "model_args" for k in sorted(self.mx_config.given)}},
                "layers": self._shipped_layers,
            }
        return info

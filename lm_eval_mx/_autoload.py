"""Register ``hf-mx`` with lm-eval, and packed MX checkpoints with transformers, in any process.

lm-eval 0.4.x has no plugin discovery, so the installed ``lm_eval_mx.pth`` imports
this module at interpreter start. It costs one small import: it only adds a
finder to ``sys.meta_path`` that waits for two modules:

- ``lm_eval.models``: then ``hf-mx`` is registered as a lazy placeholder (nothing heavy is
  imported until it is used);
- ``transformers.quantizers.auto``: then transformers' check of a checkpoint's ``quant_method``
  is wrapped so that a packed MX checkpoint (``quant_method: mx``, as ``lm-eval-mx quantize``
  writes) imports :mod:`lm_eval_mx.hf.quantizer`, which registers the ``mx`` quantizer, before
  transformers decides; so ``AutoModelForCausalLM.from_pretrained(DIR)`` loads it as stored
  instead of skipping the quantization and failing on every packed tensor's size. Nothing of
  lm_eval_mx is imported for any other checkpoint.

Set ``LM_EVAL_MX_AUTOLOAD=0`` to opt out.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

MODEL_NAME = "hf-mx"
MODEL_PATH = "lm_eval_mx.hf.model:HFMXLM"
QUANT_METHOD = "mx"


def register() -> None:
    """Register the lazy ``hf-mx`` placeholder (idempotent)."""
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=MODEL_PATH)


def _quant_method(config: Any) -> Any:
    return config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)


def hook_quantizers(auto: ModuleType) -> None:
    """Wrap ``AutoHfQuantizer.supports_quant_method`` (idempotent): a ``quant_method: mx`` config registers
    lm-eval-mx's quantizer first; every other config goes straight to transformers' own check."""
    cls = auto.AutoHfQuantizer
    original = cls.supports_quant_method
    if getattr(original, "_lm_eval_mx", False):
        return

    def supports_quant_method(quantization_config_dict: Any) -> bool:
        if str(getattr(m := _quant_method(quantization_config_dict), "value", m)).lower() == QUANT_METHOD:
            import lm_eval_mx.hf.quantizer  # noqa: F401  (registers the config and quantizer)
        return original(quantization_config_dict)

    supports_quant_method._lm_eval_mx = True  # type: ignore[attr-defined]
    cls.supports_quant_method = staticmethod(supports_quant_method)


# module -> what to do once it has been executed
HOOKS: dict[str, Callable[[ModuleType], None]] = {
    "lm_eval.models": lambda _module: register(),
    "transformers.quantizers.auto": hook_quantizers,
}


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader, then: Callable[[ModuleType], None]) -> None:
        self.inner, self.then = inner, then

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.inner.exec_module(module)
        self.then(module)


class _Finder(importlib.abc.MetaPathFinder):
    def __init__(self, pending: set[str]) -> None:
        self.pending = pending

    def find_spec(self, fullname, path, target=None):  # type: ignore[no-untyped-def]
        if fullname not in self.pending:
            return None
        self.pending.discard(fullname)  # one shot per module; also avoids recursion below
        if not self.pending:
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader, HOOKS[fullname])
        return spec


def install() -> None:
    if os.environ.get("LM_EVAL_MX_AUTOLOAD", "1").strip().lower() in ("0", "false", "no", "off"):
        return
    if any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    pending = set()
    for name, then in HOOKS.items():
        if name in sys.modules:
            then(sys.modules[name])
        else:
            pending.add(name)
    if pending:
        sys.meta_path.insert(0, _Finder(pending))


install()

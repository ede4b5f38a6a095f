"""Register ``hf-mx`` with lm-eval the moment ``lm_eval.models`` is imported, in any process.

lm-eval 0.4.x has no plugin discovery, so the installed ``lm_eval_mx.pth`` imports
this module at interpreter start. It costs one small import: it only adds a
finder to ``sys.meta_path`` that waits for ``lm_eval.models`` and then registers
``hf-mx`` as a lazy placeholder (nothing heavy is imported until it is used).
Set ``LM_EVAL_MX_AUTOLOAD=0`` to opt out.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from types import ModuleType

TARGET = "lm_eval.models"
MODEL_NAME = "hf-mx"
MODEL_PATH = "lm_eval_mx.hf.model:HFMXLM"


def register() -> None:
    """Register the lazy ``hf-mx`` placeholder (idempotent)."""
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=MODEL_PATH)


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.inner.exec_module(module)
        register()


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):  # type: ignore[no-untyped-def]
        if fullname != TARGET:
            return None
        sys.meta_path.remove(self)  # one shot; also avoids recursion below
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    if os.environ.get("LM_EVAL_MX_AUTOLOAD", "1").strip().lower() in ("0", "false", "no", "off"):
        return
    if TARGET in sys.modules:
        register()
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


install()

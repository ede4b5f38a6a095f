"""lm-eval-mx: how much accuracy a language model loses when its matmuls run in OCP MX formats.

Importing this package is cheap (no torch): the public names load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "quantize_mx": "lm_eval_mx.numerics.quantize",
    "get_format": "lm_eval_mx.numerics.formats",
    "FORMATS": "lm_eval_mx.numerics.formats",
    "MXConfig": "lm_eval_mx.selection.config",
    "parse_mx_args": "lm_eval_mx.selection.config",
    "apply_mx": "lm_eval_mx.selection.apply",
    "MXReport": "lm_eval_mx.selection.report",
    "mx_disabled": "lm_eval_mx.nn.layers",
    "MXQuantizationConfig": "lm_eval_mx.hf.quantizer",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lm_eval_mx' has no attribute {name!r}")

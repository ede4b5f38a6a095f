"""gpt-oss MXFP4 checkpoints (``quant_method: mxfp4``): experts stored as ``*_blocks`` / ``*_scales``."""

from __future__ import annotations

from typing import Any

from .base import Shipped, unsupported

QUANT_METHODS = ("mxfp4",)
SUPPORTED: tuple[str, ...] = ()


def recognise(qc: dict[str, Any]) -> Shipped:
    raise unsupported("this checkpoint stores gpt-oss MXFP4 experts (quant_method mxfp4), not supported yet")

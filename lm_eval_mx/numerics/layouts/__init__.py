"""The packed FP4 weight layouts shipped checkpoints use: exact decoders, encoders, and their ``Scheme``.

Four layouts, each a :class:`Layout` in :data:`LAYOUTS` with its functions in one module per format
(``compressed_tensors``, ``modelopt``, ``gptoss``; shared pieces in ``_common``); every name is re-exported here:

* ``ct-nvfp4``: compressed-tensors ``nvfp4-pack-quantized`` (llm-compressor's NVFP4 checkpoints);
* ``ct-mxfp4``: compressed-tensors ``mxfp4-pack-quantized`` (E8M0 exponents stored as uint8);
* ``modelopt-nvfp4``: NVIDIA ModelOpt's NVFP4 export (``quant_algo: NVFP4``), as vLLM and TensorRT-LLM read it;
* ``gptoss-mxfp4``: OpenAI gpt-oss MoE experts (``*_blocks``/``*_scales``), as transformers reads them.

All four store FP4 E2M1 codes two to a byte, the element of even index in the low nibble, a code being
sign (bit 3) and magnitude index (bits 0-2) into ``0, 0.5, 1, 1.5, 2, 3, 4, 6`` (this project's
:func:`lm_eval_mx.numerics.packing.code_table` for ``fp4_e2m1``). They differ in the block scales and in how the
per-tensor scale enters. Every decoder returns float32 and reproduces its library's float32 arithmetic
operation for operation, so that its result equals the library's bit for bit (the library's own bf16
output is this float32 result rounded to bf16). The encoders reproduce what the library writes for a
high-precision weight, and, given the stored scales, are the exact inverse of the decoders.


Only ``..formats``, ``..quantize``, ``..packing`` and torch are imported: nothing here needs the libraries.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

# Every public name this module had before it became a package stays importable from it; the private helpers
# live in ._common for the codec modules.
from ..formats import FORMATS, NAMED_SCHEMES, Rounding, ScaleMode, Scheme
from ..packing import MXPacked, code_table
from ..quantize import pow2, quantize_blocks, round_elements
from ._common import (
    CT_MXFP4,
    FP4,
    MXFP4,
    NVFP4,
    fp4_codes,
)
from .compressed_tensors import (
    ct_mxfp4_to_packed,
    ct_nvfp4_block_scales,
    ct_nvfp4_global_scale,
    ct_nvfp4_to_packed,
    decode_ct_mxfp4,
    decode_ct_nvfp4,
    encode_ct_mxfp4,
    encode_ct_nvfp4,
)
from .gptoss import decode_gptoss_mxfp4, encode_gptoss_mxfp4, gptoss_mxfp4_to_packed
from .modelopt import (
    decode_modelopt_nvfp4,
    encode_modelopt_nvfp4,
    modelopt_nvfp4_block_scales,
    modelopt_nvfp4_to_packed,
    modelopt_nvfp4_weight_scale_2,
)

__all__ = [
    "CT_MXFP4",
    "FORMATS",
    "FP4",
    "LAYOUTS",
    "MXFP4",
    "NAMED_SCHEMES",
    "NVFP4",
    "Layout",
    "MXPacked",
    "Rounding",
    "ScaleMode",
    "Scheme",
    "code_table",
    "ct_mxfp4_to_packed",
    "ct_nvfp4_block_scales",
    "ct_nvfp4_global_scale",
    "ct_nvfp4_to_packed",
    "decode_ct_mxfp4",
    "decode_ct_nvfp4",
    "decode_gptoss_mxfp4",
    "decode_modelopt_nvfp4",
    "encode_ct_mxfp4",
    "encode_ct_nvfp4",
    "encode_gptoss_mxfp4",
    "encode_modelopt_nvfp4",
    "fp4_codes",
    "get_layout",
    "gptoss_mxfp4_to_packed",
    "modelopt_nvfp4_block_scales",
    "modelopt_nvfp4_to_packed",
    "modelopt_nvfp4_weight_scale_2",
    "pow2",
    "quantize_blocks",
    "round_elements",
]

# The table


@dataclass(frozen=True)
class Layout:
    """One stored layout: its tensor names (decode's argument order), the :class:`Scheme` the stored weights
    correspond to, and its functions. ``exact_scale_order``: whether the library's dequantization is this
    project's float32 order for ``scheme`` (``value · multiplier`` with the same multiplier), so that
    ``unpack_mx(to_packed(...))`` equals ``decode(...)`` for any stored scales."""

    name: str
    library: str
    tensors: tuple[str, ...]
    scheme: Scheme
    decode: Callable[..., torch.Tensor]
    encode: Callable[..., dict[str, torch.Tensor]]
    to_packed: Callable[..., MXPacked]
    exact_scale_order: bool

    def decode_dict(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``decode`` of a module's tensors by name; ``ValueError`` naming any missing one."""
        return self.decode(*self._args(tensors))

    def to_packed_dict(self, tensors: Mapping[str, torch.Tensor], **kwargs: object) -> MXPacked:
        return self.to_packed(*self._args(tensors), **kwargs)

    def _args(self, tensors: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        missing = [n for n in self.tensors if n not in tensors]
        if missing:
            raise ValueError(f"{self.name}: missing tensor(s) {missing}; the layout stores {list(self.tensors)}, "
                             f"got {sorted(tensors)}")
        return [tensors[n] for n in self.tensors]


LAYOUTS: dict[str, Layout] = {
    lay.name: lay
    for lay in (
        Layout("ct-nvfp4", "compressed-tensors nvfp4-pack-quantized",
               ("weight_packed", "weight_scale", "weight_global_scale"), NVFP4,
               decode_ct_nvfp4, encode_ct_nvfp4, ct_nvfp4_to_packed, exact_scale_order=False),
        Layout("ct-mxfp4", "compressed-tensors mxfp4-pack-quantized", ("weight_packed", "weight_scale"),
               CT_MXFP4, decode_ct_mxfp4, encode_ct_mxfp4, ct_mxfp4_to_packed, exact_scale_order=True),
        Layout("modelopt-nvfp4", "NVIDIA ModelOpt NVFP4", ("weight", "weight_scale", "weight_scale_2"), NVFP4,
               decode_modelopt_nvfp4, encode_modelopt_nvfp4, modelopt_nvfp4_to_packed, exact_scale_order=True),
        Layout("gptoss-mxfp4", "gpt-oss MXFP4 (transformers)", ("blocks", "scales"), MXFP4,
               decode_gptoss_mxfp4, encode_gptoss_mxfp4, gptoss_mxfp4_to_packed, exact_scale_order=True),
    )
}


def get_layout(name: str) -> Layout:
    key = str(name).strip().lower().replace("_", "-")
    if key not in LAYOUTS:
        raise ValueError(f"unknown packed layout {name!r}; known: {', '.join(sorted(LAYOUTS))}")
    return LAYOUTS[key]

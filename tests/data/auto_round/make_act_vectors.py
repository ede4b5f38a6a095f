"""Activation vectors computed by auto-round's own quantizers, for tests/test_auto_round.py (no auto-round in CI).

    /work/venvs/autoround/bin/python tests/data/auto_round/make_act_vectors.py   # auto-round 0.16.1, torch 2.13.0

Inputs [16, 64] float32: normal rows at scales 2**-12..2**12, rows whose block maxima sit one to forty float32 ulps
below a power of two (where float32 log2 rounds up), a zero block, a block with an element far below its maximum
(E4M3 subnormals: where the MXFP8 scale rule shows) and ties. Outputs: auto-round's
``quant_mx`` as ``MXQuantLinearBase.qdq_input`` calls it (``get_quant_func("mx_fp", bits, sym=True)``) for MXFP4 and
MXFP8, and ``NVFP4QuantLinear.qdq_input`` (``_nv_fp4_with_static_gs``) with a fixed input_global_scale.
"""

from __future__ import annotations

import os

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 64, generator=g) * (2.0 ** torch.arange(-12, 20, 2).float()).reshape(16, 1)
    for r, p in ((10, 3.0), (11, 6.0), (12, -1.0), (13, 8.0)):  # a block maximum k ulps below 2**p
        below = torch.nextafter(torch.tensor(2.0**p), torch.tensor(0.0))
        for k in range(32):
            x[r, k] = torch.tensor(below.item()) * (1 - k * 2.0**-24)
    x[14] = 0.0  # a zero block, then a block of maximum 1.25 holding an E4M3-subnormal-range element
    x[14, 32], x[14, 33] = 1.25, 1.25 * 2.0**-15
    x[13, 32:] = 0.0  # and one of maximum 1.75 = 448 * 2**-8: compressed-tensors' MXFP8 scale 2**-7, RCEIL's 2**-8
    x[13, 32], x[13, 33] = 1.75, 1.625 * 2.0**-16
    x[15] = torch.arange(64).float() * 0.25 - 8.0  # ties on the E2M1 grid
    return x


def main() -> None:
    from auto_round.data_type.utils import get_quant_func
    from auto_round.experimental.qmodules.nvfp4 import _nv_fp4_with_static_gs
    from safetensors.torch import save_file

    x = inputs()
    out = {"x": x}
    for bits in (4, 8):
        fn, _ = get_quant_func(dtype="mx_fp", bits=bits, sym=True)
        out[f"mxfp{bits}"] = fn(tensor=x, bits=bits, group_size=32)[0].contiguous()
    gs = torch.tensor([2688.0 / 37.5], dtype=torch.float32)
    out["nvfp4_gs"] = gs
    out["nvfp4"] = _nv_fp4_with_static_gs(x[:10], gs, 4, 16)[0].contiguous()  # rows within the calibrated range
    save_file(out, os.path.join(HERE, "act_vectors.safetensors"))


if __name__ == "__main__":
    main()

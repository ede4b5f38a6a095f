"""Write autoround_mx.pt: auto-round's own RTN MX quantizer (auto_round.data_type.mxfp.quant_mx, the function its
MXFP4/MXFP8 schemes call for weights and, dynamically, for activations) on fixed inputs, for tests/test_profiles.py.

Run in a venv holding auto-round (kept out of this project's dependencies):
    /work/venvs/autoround/bin/python tests/data/profiles/make_autoround_mx.py
"""

from pathlib import Path

import torch
from auto_round import __version__
from auto_round.data_type.mxfp import quant_mx


def inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 64, generator=g) * torch.logspace(-4, 4, 8).unsqueeze(1)
    edge = torch.full((1, 32), 0.5)
    edge[0, 0] = 4 * (2 - 2.0**-23)  # a block maximum just below a power of two: torch.log2 rounds it up to 3
    return {"float32": x, "bfloat16": x.to(torch.bfloat16), "edge": edge}


def main() -> None:
    out: dict[str, object] = {"auto_round": __version__, "torch": str(torch.__version__)}
    for name, x in inputs().items():
        out[f"in/{name}"] = x
        for fmt, bits in (("mx_fp4", 4), ("mx_fp8", 8)):
            out[f"out/{name}/{fmt}"] = quant_mx(x, bits=bits, group_size=32, data_type=fmt)[0]
    torch.save(out, Path(__file__).with_name("autoround_mx.pt"))
    print({k: (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else v for k, v in out.items()})


if __name__ == "__main__":
    main()

"""Write quark_mx.pt: AMD Quark's own MX fake quantizer (quark.torch.kernel.hw_emulation.hw_emulation_interface.
fake_quantize_mx, scale_calculation_mode="even", the PerBlockMXObserver default) on fixed inputs, for
tests/test_profiles.py.

Run in a venv holding amd-quark (kept out of this project's dependencies):
    /work/venvs/quark/bin/python tests/data/profiles/make_quark_mx.py
"""

from importlib.metadata import version
from pathlib import Path

import torch
from quark.torch.kernel.hw_emulation.hw_emulation_interface import fake_quantize_mx


def main() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 64, generator=g) * torch.logspace(-4, 4, 8).unsqueeze(1)
    out: dict[str, object] = {"amd_quark": version("amd-quark"), "torch": str(torch.__version__)}
    for name, t in (("float32", x), ("bfloat16", x.to(torch.bfloat16))):
        out[f"in/{name}"] = t
        for fmt in ("fp4", "fp8_e4m3"):
            out[f"out/{name}/{fmt}"] = fake_quantize_mx(t, -1, 32, "even", mx_element_dtype=fmt)
    torch.save(out, Path(__file__).with_name("quark_mx.pt"))
    print({k: (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else v for k, v in out.items()})


if __name__ == "__main__":
    main()

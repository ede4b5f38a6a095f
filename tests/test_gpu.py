"""The golden cases on CUDA, for every GPU backend, and the MX layers on CUDA (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch
from test_numerics import CASES, run_golden

from lm_eval_mx.backends import get_quantizer
from lm_eval_mx.formats import get_format, get_rounding, get_scale_mode

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
BACKENDS = ["torch", "triton"]


def _call(name):
    q = get_quantizer(name)

    def fn(x, fmt, block, axis, rounding, scale_bits):
        return q(x, get_format(fmt), block, axis, get_rounding(rounding), scale_bits, get_scale_mode("floor"))

    return fn


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c["key"] for c in CASES])
def test_golden_cuda(case, backend):
    run_golden(case, "cuda", _call(backend))


def test_layers_on_cuda_match_cpu():
    """Weights quantized once on the GPU (Triton) equal the CPU reference bit for bit."""
    from conftest import tiny_model

    from lm_eval_mx import MXConfig, apply_mx

    cpu = tiny_model("gpt2")
    gpu = tiny_model("gpt2").cuda()
    apply_mx(cpu, MXConfig(w_format="fp4", a_format="fp4"))
    apply_mx(gpu, MXConfig(w_format="fp4", a_format="fp4"))
    for (name, a), (_, b) in zip(cpu.named_parameters(), gpu.named_parameters()):
        assert torch.equal(a, b.cpu()), name
    ids = torch.arange(40).view(2, 20)
    with torch.no_grad():
        lc, lg = cpu(ids).logits, gpu(ids.cuda()).logits.cpu()
    assert (lc - lg).abs().max() < 1e-3


def test_attention_bmm_on_cuda_matches_reference():
    """MX attention matmuls through the Triton backend equal the CPU torch reference operands."""
    from lm_eval_mx import attention
    from lm_eval_mx.layers import MXSpec

    class Mod(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("Cfg", (), {})()

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 64, 32, generator=g) for _ in range(3))
    outs = []
    for device in ("cpu", "cuda"):
        mod = Mod()
        attention._STATES[id(mod.config)] = attention._State(MXSpec.make("fp8", "fp8"), True, "sdpa")
        try:
            out, _ = attention.mx_attention_forward(mod, q.to(device), k.to(device), v.to(device), None, scaling=0.2)
        finally:
            attention._STATES.pop(id(mod.config))
        outs.append(out.cpu())
    assert (outs[0] - outs[1]).abs().max() < 1e-4

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

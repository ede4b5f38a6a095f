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


def _hard_weight(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    """Rows at scales 2**-60..2**60, with zero, tiny (subnormal-scale), huge, inf and NaN blocks."""
    w = torch.randn(n, k, generator=g) * torch.exp2(torch.randint(-60, 61, (n, 1), generator=g).float())
    w[0, :32] = 0.0
    w[1, :32] *= 1e-38
    w[2, :32] = 3e38
    if n > 4:
        w[3, 5] = float("inf")
        w[4, 40 % k] = float("nan")
    return w


PACK_FORMATS = ["fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1", "int8", "int4", "int2"]
GEMM_SHAPES = [(7, 130, 200, 32), (300, 96, 4096 + 17, 16), (33, 40, 72, 0)]
TILE = (64, 64, 64)  # one compilation per format width; autotuning is exercised by the model test


@pytest.mark.parametrize("fmt", PACK_FORMATS)
@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=str)
def test_packed_gemm_decodes_weights_exactly(fmt, shape):
    """x = I (float32, IEEE dot): every output is one weight, so it must equal unpack_mx bit for bit."""
    from lm_eval_mx.kernels import mx_packed_linear_triton, mx_unpack_triton
    from lm_eval_mx.packing import pack_mx, unpack_mx

    _, n, k, bs = shape
    w = _hard_weight(n, k, torch.Generator().manual_seed(n + k))
    p = pack_mx(w.cuda(), fmt, block_size=bs)
    eye = torch.eye(k, device="cuda")
    got = mx_packed_linear_triton(eye, p, out_dtype=torch.float32, tile=TILE).cpu()
    wq = unpack_mx(pack_mx(w, fmt, block_size=bs))
    want = (torch.eye(k, dtype=torch.float64) @ wq.double().T).float()
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    for dtype in (torch.float32, torch.bfloat16):  # the dequantize kernel of packed_gemm=dequant
        torch.testing.assert_close(mx_unpack_triton(p, dtype).cpu(), wq.to(dtype), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("fmt", PACK_FORMATS)
@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True])
def test_packed_gemm_matches_fake_quant_up_to_accumulation_order(fmt, shape, bias):
    """Stated tolerance: the float32 accumulator is within 2·K·2⁻²⁴·Σ|x||w| of the exact product sum
    (a summation-order bound), and bf16 outputs differ from the fake-quant F.linear by at most that
    plus one bf16 rounding of each (2⁻⁸ relative each)."""
    from lm_eval_mx.kernels import mx_packed_linear_triton
    from lm_eval_mx.numerics import quantize_mx
    from lm_eval_mx.packing import pack_mx, unpack_mx

    m, n, k, bs = shape
    g = torch.Generator().manual_seed(m * n * k)
    x = quantize_mx(torch.randn(m, k, generator=g), "fp8_e4m3", block_size=bs).to(torch.bfloat16).cuda()
    w = (torch.randn(n, k, generator=g) * 0.05).cuda()
    b = (torch.randn(n, generator=g).to(torch.bfloat16).cuda()) if bias else None
    p = pack_mx(w, fmt, block_size=bs)
    wq = unpack_mx(p, torch.bfloat16)
    exact = x.double() @ wq.double().T + (b.double() if bias else 0)
    bound = 2 * k * 2.0**-24 * (x.double().abs() @ wq.double().abs().T) + 1e-30
    acc = mx_packed_linear_triton(x, p, b, out_dtype=torch.float32, tile=TILE)
    assert ((acc.double() - exact).abs() <= bound).all()
    out = mx_packed_linear_triton(x, p, b, tile=TILE)
    fake = torch.nn.functional.linear(x, wq, b)
    assert out.dtype == fake.dtype == torch.bfloat16
    tol = bound + 2.0**-7 * exact.abs() + 2.0**-133
    assert ((out.double() - fake.double()).abs() <= tol).all()


@pytest.mark.parametrize("arch", ["llama", "mixtral", "gpt2"])
def test_packed_models_on_cuda(tmp_path, arch):
    """Packed on the GPU: backend=torch and the dequantize kernel are bit-identical to fake quant;
    the fused GEMM (autotuned) agrees up to accumulation order."""
    from conftest import save_tiny
    from transformers import AutoModelForCausalLM

    from lm_eval_mx import MXConfig, MXQuantizationConfig, apply_mx

    d = save_tiny(tmp_path, arch)
    ids = torch.arange(80, device="cuda").view(2, 40) % 128
    kw = dict(w_format="fp4_e2m1", a_format="fp8_e4m3")
    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16, device_map="cuda")
    apply_mx(ref, MXConfig(**kw))
    with torch.no_grad():
        want = ref(ids).logits.float()
        for backend, gemm in (("torch", "dequant"), ("triton", "dequant"), ("triton", "fused")):
            qc = MXQuantizationConfig(**kw, mx_backend=backend, packed_gemm=gemm)
            m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16, device_map="cuda", quantization_config=qc)
            got = m(ids).logits.float()
            if gemm == "dequant":
                assert torch.equal(got, want)
            else:
                assert (got - want).abs().max() <= 0.05 * want.abs().max()

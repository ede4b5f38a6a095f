"""On CUDA (skipped without it): the golden cases through every backend, a property test demanding bit equality
of the Triton kernels with the torch path over every scheme parameter, rotations, packed weights (E8M0 and E4M3
scales), and whole models."""

from __future__ import annotations

import itertools
import random
import zlib

import pytest
import torch
from test_numerics import CASES, run_golden

from lm_eval_mx.kernels.backends import get_quantizer
from lm_eval_mx.numerics.formats import FORMATS, NAMED_SCHEMES
from lm_eval_mx.numerics.quantize import make_scheme, quantize_torch
from lm_eval_mx.numerics.rotation import Rotation

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
BACKENDS = ["torch", "triton"]


def _call(name):
    q = get_quantizer(name)

    def fn(x, fmt, block, axis, rounding, scale_bits):
        return q(x, make_scheme(fmt, block, rounding, scale_bits), axis)

    return fn


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c["key"] for c in CASES])
def test_golden_cuda(case, backend):
    run_golden(case, "cuda", _call(backend))


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.float(), b.float()
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a[~nan].view(torch.int32), b[~nan].view(torch.int32))


def _family(name: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Data families: random at wide scales, zero/tiny/huge blocks, inf and NaN blocks, exact ties."""
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-30, 31, (*shape[:-1], 1), generator=g).float())
    flat = x.view(-1, shape[-1])
    if name == "edge":
        flat[0, :40] = 0.0
        flat[1 % flat.shape[0], :40] *= 1e-38
        flat[2 % flat.shape[0], :40] = 3e38 * torch.sign(flat[2 % flat.shape[0], :40])
    elif name == "nonfinite":
        flat[0, 3] = float("inf")
        flat[-1, -1] = float("nan")
    elif name == "ties":
        x = torch.randint(-64, 64, shape, generator=g).float() * 0.25
    return x


PARAMS = list(itertools.product(sorted(FORMATS), ["nearest", "even", "floor"], ["floor", "ceil", "even", "rceil"],
                                [8, 5, 2], [torch.float32, torch.bfloat16, torch.float16], [-1, 0]))
SAMPLED = random.Random(0).sample(PARAMS, 96)  # every value of each parameter occurs (checked below)


def test_sample_covers_every_parameter_value():
    for i, values in enumerate(zip(*PARAMS)):
        assert set(values) == {p[i] for p in SAMPLED}


@pytest.mark.parametrize("fmt, rounding, mode, scale_bits, dtype, axis", SAMPLED, ids=str)
def test_triton_equals_torch_property(fmt, rounding, mode, scale_bits, dtype, axis):
    """Bit equality of the Triton kernel with the torch path on CUDA: random and edge data, ragged tails,
    every format x rounding x scale mode x scale_bits x dtype x axis (sampled), blocks 32, 16, 24 (general
    kernel) and 0."""
    g = torch.Generator().manual_seed(zlib.crc32(repr((fmt, rounding, mode, scale_bits, dtype, axis)).encode()))
    for block, family, shape in itertools.product([32, 16, 24, 0], ["random", "edge", "nonfinite", "ties"],
                                                  [(6, 96), (5, 100)]):
        x = _family(family, shape, g).to(dtype).cuda()
        if axis == 0:
            x = x.T.contiguous()
        scheme = make_scheme(fmt, block, rounding, scale_bits, mode)
        got = get_quantizer("triton")(x, scheme, axis)
        assert _bits_equal(got, quantize_torch(x, scheme, axis)), (block, family, shape)


E4M3_SCHEMES = [NAMED_SCHEMES["nvfp4"], make_scheme("fp4_e2m1", 16, scale_format="e4m3"),
                make_scheme("fp8_e4m3", 32, "nearest", scale_format="e4m3", tensor_scale="amax"),
                make_scheme("int4", 24, scale_format="e4m3", tensor_scale="amax")]
ROTATIONS = [None, Rotation(16), Rotation(32, 7), Rotation(128), Rotation(0, 1)]


@pytest.mark.parametrize("scheme", [*E4M3_SCHEMES, make_scheme("fp4_e2m1"), make_scheme("fp8_e4m3", 0)], ids=lambda s: s.name)
@pytest.mark.parametrize("rotation", ROTATIONS, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16], ids=str)
def test_schemes_and_rotations_triton_equals_torch(scheme, rotation, dtype):
    """E4M3 scales (the per-tensor maximum by atomic max over many programs) and fused rotations, large tensors."""
    g = torch.Generator().manual_seed(3)
    for shape, family in [((8192, 512), "random"), ((3, 7, 256), "edge"), ((64, 4096), "nonfinite"), ((2, 96), "random")]:
        x = _family(family, shape, g).to(dtype).cuda()
        try:
            want = quantize_torch(x, scheme, -1, rotation)
        except ValueError:  # the rotation block does not divide this row: refused by both
            continue
        assert _bits_equal(get_quantizer("triton")(x, scheme, -1, rotation), want), (shape, family)


@pytest.mark.parametrize("arch", ["llama", "phi3", "mixtral", "qwen2_moe", "gemma"])
@pytest.mark.parametrize("cfg", [{"format": "fp8_e4m3"}, {"format": "nvfp4"},
                                 {"format": "fp4_e2m1", "rotation": "hadamard", "rotation_seed": 2}], ids=str)
def test_models_triton_equal_torch_backend(arch, cfg):
    """Whole models on CUDA: the Triton backend gives the torch backend's logits, bit for bit."""
    from conftest import tiny_model

    from lm_eval_mx import apply_mx
    from lm_eval_mx.selection.config import parse_mx_args

    ids = torch.randint(0, 128, (3, 40), generator=torch.Generator().manual_seed(0)).cuda()
    logits = {}
    for backend in ("torch", "triton"):
        model = tiny_model(arch, dtype=torch.bfloat16).cuda()
        apply_mx(model, parse_mx_args({**cfg, "mx_backend": backend})[0])
        with torch.no_grad():
            logits[backend] = model(ids).logits
    assert torch.isfinite(logits["torch"]).all() and torch.equal(logits["torch"], logits["triton"])


@pytest.mark.parametrize("cfg", [{"format": "fp8_e4m3"}, {"format": "nvfp4"},
                                 {"format": "fp4_e2m1", "rotation": "hadamard", "rotation_seed": 2}], ids=str)
def test_torch_compile_of_triton_layers_is_exact(cfg):
    """torch.compile (dynamo, eager backend: no fusion of the model's own ops) of a model whose MX layers
    launch the Triton kernels gives the eager logits bit for bit."""
    from conftest import tiny_model

    from lm_eval_mx import apply_mx
    from lm_eval_mx.selection.config import parse_mx_args

    ids = torch.randint(0, 128, (3, 40), generator=torch.Generator().manual_seed(0)).cuda()
    model = tiny_model("llama", dtype=torch.bfloat16).cuda()
    apply_mx(model, parse_mx_args({**cfg, "mx_backend": "triton"})[0])
    with torch.no_grad():
        ref = model(ids).logits
        torch._dynamo.reset()
        out = torch.compile(model, backend="eager")(ids).logits
    assert torch.equal(out, ref)


@pytest.mark.parametrize("scheme, rotation", [(make_scheme("fp8_e4m3"), None), (NAMED_SCHEMES["nvfp4"], None),
                                              (make_scheme("fp4_e2m1"), Rotation(32, 7)),
                                              (NAMED_SCHEMES["nvfp4"], Rotation(16))], ids=str)
def test_cached_launcher_equals_plain_launch(scheme, rotation, monkeypatch):
    """The compiled kernels' own launcher (lm_eval_mx.kernels.launch, after a first launch through kernel[grid])
    computes what the plain launch and the torch path compute, bit for bit: repeated calls, ragged and whole
    tiles, an input not 16-byte aligned, bf16 then float32, replayed in a CUDA graph; and this Triton uses it."""
    from lm_eval_mx.kernels import launch
    from lm_eval_mx.kernels.triton_mx import ActQuantizer

    aq = ActQuantizer(scheme, rotation)
    g = torch.Generator().manual_seed(11)
    for dtype in (torch.bfloat16, torch.float32):
        for rows, offset in ((8, 0), (8, 0), (5, 0), (8, 1), (8, 0), (1024, 0)):
            buf = (torch.randn(offset + rows * 256, generator=g) * 2.0 ** (rows % 7)).to(dtype).cuda()
            x = buf[offset:].view(rows, 256)
            want = quantize_torch(x, scheme, -1, rotation)
            for fast in (True, False, True):
                monkeypatch.setattr(launch, "FAST", fast)
                assert _bits_equal(aq(x), want), (dtype, rows, offset, fast)
    assert sum(len(lau.cache) for plan in aq.plans.values() for lau in plan.launches.values()) >= 4
    monkeypatch.setattr(launch, "FAST", True)
    x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
    aq(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = aq(x)
    x.copy_(torch.randn(8, 256, generator=g).to(torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    assert _bits_equal(y, quantize_torch(x, scheme, -1, rotation))


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
    from lm_eval_mx.nn import attention
    from lm_eval_mx.nn.spec import MXSpec

    class Mod(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("Cfg", (), {})()

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 64, 32, generator=g) for _ in range(3))
    outs = []
    for device in ("cpu", "cuda"):
        mod = Mod()
        attention._STATES[id(mod.config)] = attention._State(MXSpec.make("fp8", "fp8", rotation=Rotation(32, 1)),
                                                             True, "sdpa")
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


PACK_SCHEMES = [make_scheme(f) for f in ["fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1", "int8", "int4",
                                         "int2"]] + [NAMED_SCHEMES["nvfp4"], make_scheme("fp4_e2m1", 32, scale_format="e4m3")]
GEMM_SHAPES = [(7, 130, 200, 32), (300, 96, 4096 + 17, 16), (33, 40, 72, 0)]
TILE = (64, 64, 64)  # one compilation per format width; autotuning is exercised by the model test


def _pack(w, scheme, bs):
    from dataclasses import replace

    from lm_eval_mx.numerics.packing import pack

    return pack(w, replace(scheme, block_size=bs if scheme.is_mx else scheme.block_size))


@pytest.mark.parametrize("scheme", PACK_SCHEMES, ids=lambda s: s.name)
@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=str)
def test_packed_gemm_decodes_weights_exactly(scheme, shape):
    """x = I (float32, IEEE dot): every output is one weight, so it must equal unpack_mx bit for bit."""
    from lm_eval_mx.kernels.triton_mx import mx_packed_linear_triton, mx_unpack_triton
    from lm_eval_mx.numerics.packing import unpack_mx

    _, n, k, bs = shape
    w = _hard_weight(n, k, torch.Generator().manual_seed(n + k))
    if not scheme.is_mx:
        w = w.clamp(-1e4, 1e4).nan_to_num(0.0)  # E4M3 scales with a tensor scale: a finite tensor
    p = _pack(w.cuda(), scheme, bs)
    eye = torch.eye(k, device="cuda")
    got = mx_packed_linear_triton(eye, p, out_dtype=torch.float32, tile=TILE).cpu()
    wq = unpack_mx(_pack(w, scheme, bs))
    want = (torch.eye(k, dtype=torch.float64) @ wq.double().T).float()
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    for dtype in (torch.float32, torch.bfloat16):  # the dequantize kernel of packed_gemm=dequant
        torch.testing.assert_close(mx_unpack_triton(p, dtype).cpu(), wq.to(dtype), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("scheme", PACK_SCHEMES, ids=lambda s: s.name)
@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=str)
def test_packed_gemm_matches_fake_quant_up_to_accumulation_order(scheme, shape):
    """Stated tolerance: the float32 accumulator is within 2·K·2⁻²⁴·Σ|x||w| of the exact product sum
    (a summation-order bound), and bf16 outputs differ from the fake-quant F.linear by at most that
    plus one bf16 rounding of each (2⁻⁸ relative each)."""
    from lm_eval_mx.kernels.triton_mx import mx_packed_linear_triton
    from lm_eval_mx.numerics.packing import unpack_mx
    from lm_eval_mx.numerics.quantize import quantize_mx

    m, n, k, bs = shape
    g = torch.Generator().manual_seed(m * n * k)
    x = quantize_mx(torch.randn(m, k, generator=g), "fp8_e4m3", block_size=bs).to(torch.bfloat16).cuda()
    w = (torch.randn(n, k, generator=g) * 0.05).cuda()
    b = torch.randn(n, generator=g).to(torch.bfloat16).cuda()
    p = _pack(w, scheme, bs)
    wq = unpack_mx(p, torch.bfloat16)
    exact = x.double() @ wq.double().T + b.double()
    bound = 2 * k * 2.0**-24 * (x.double().abs() @ wq.double().abs().T) + 1e-30
    acc = mx_packed_linear_triton(x, p, b, out_dtype=torch.float32, tile=TILE)
    assert ((acc.double() - exact).abs() <= bound).all()
    out = mx_packed_linear_triton(x, p, b, tile=TILE)
    fake = torch.nn.functional.linear(x, wq, b)
    assert out.dtype == fake.dtype == torch.bfloat16
    tol = bound + 2.0**-7 * exact.abs() + 2.0**-133
    assert ((out.double() - fake.double()).abs() <= tol).all()


@pytest.mark.parametrize("arch", ["llama", "mixtral", "gpt2"])
@pytest.mark.parametrize("kw", [dict(w_format="fp4_e2m1", a_format="fp8_e4m3"), dict(format="nvfp4", rotation="hadamard")],
                         ids=str)
def test_packed_models_on_cuda(tmp_path, arch, kw):
    """Packed on the GPU: mx_backend=torch and the dequantize kernel are bit-identical to fake quant;
    the fused GEMM (autotuned) agrees up to accumulation order."""
    from conftest import save_tiny
    from transformers import AutoModelForCausalLM

    from lm_eval_mx import MXQuantizationConfig, apply_mx
    from lm_eval_mx.selection.config import parse_mx_args

    d = save_tiny(tmp_path, arch)
    ids = torch.arange(80, device="cuda").view(2, 40) % 128
    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16, device_map="cuda")
    apply_mx(ref, parse_mx_args(kw)[0])
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

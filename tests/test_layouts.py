"""Packed checkpoint layouts (lm_eval_mx.numerics.layouts): decoders bit-equal to each format's own library, encoders their
exact inverse, the mapping to this project's Scheme and MXPacked, and the errors.

Cross-checked against: compressed-tensors' NVFP4/MXFP4 compressors (decompress, compress, and the qparam functions
llm-compressor's observer calls); transformers' gpt-oss ``convert_moe_packed_tensors``; for ModelOpt (not
installable beside this project's pins) an explicit transcription, below, of ``NVFP4QTensor.quantize`` /
``dequantize`` (modelopt/torch/quantization/qtensor/nvfp4_tensor.py, non-fast path).
"""

from __future__ import annotations

import pytest
import torch

from lm_eval_mx.numerics import layouts as L
from lm_eval_mx.numerics.packing import pack, unpack_mx
from lm_eval_mx.numerics.quantize import quantize_torch, tensor_scale


def bits(t: torch.Tensor) -> torch.Tensor:
    """float32 bit patterns (so -0.0 != +0.0 and NaNs compare by payload)."""
    return t.to(torch.float32).contiguous().view(torch.int32)


def assert_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = bits(a) != bits(b)
    assert not diff.any(), f"{int(diff.sum())} of {diff.numel()} differ, e.g. {a[diff][:4]} vs {b[diff][:4]}"


def assert_values(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bit for bit, -0.0 read as +0.0."""
    assert_bits(a + 0.0, b + 0.0)


def no_negative_zero(packed: torch.Tensor) -> torch.Tensor:
    """Code 8 (-0) -> code 0 in both nibbles: what an encoder writes back for a decoded -0.0."""
    lo, hi = packed & 0x0F, packed >> 4
    lo, hi = torch.where(lo == 8, 0, lo), torch.where(hi == 8, 0, hi)
    return (lo | (hi << 4)).to(torch.uint8)


def nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack((packed & 0x0F, packed >> 4), -1).flatten(-2)


def weights(shape=(32, 256), seed=0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * torch.exp2(torch.randint(-6, 6, (*shape[:-1], 1), generator=g).float())
    w[..., 1, :16] = 0.0  # a zero block
    w[..., 2, 16:48] = 1e-3 * torch.randn(32, generator=g)  # small blocks
    return w.to(dtype)


def stored_nvfp4(shape=(24, 128), seed=0, lo=0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random packed bytes, finite E4M3 block scales (subnormals and, for lo=0, 0 included), a float32 per-tensor
    scale."""
    g = torch.Generator().manual_seed(seed)
    n, k = shape
    packed = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    scale = torch.randint(lo, 0x7F, (n, k // 16), generator=g, dtype=torch.uint8).view(torch.float8_e4m3fn)
    per_tensor = torch.exp2(torch.empty(1).uniform_(-12, 20, generator=g)).to(torch.float32)
    return packed, scale, per_tensor


def stored_mx(shape=(24, 128), seed=0, lo=0, hi=255) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n, k = shape
    packed = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    scale = torch.randint(lo, hi, (n, k // 32), generator=g, dtype=torch.uint8)
    return packed, scale


# ------------------------------------------------------------------------------------------------------------
# compressed-tensors


@pytest.fixture(scope="module")
def ct():
    pytest.importorskip("compressed_tensors", minversion="0.20")
    from compressed_tensors.compressors.mxfp4 import MXFP4PackedCompressor
    from compressed_tensors.compressors.nvfp4 import NVFP4PackedCompressor
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import dequantize
    from compressed_tensors.quantization.quant_scheme import MXFP4, NVFP4
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    class CT:
        nvfp4 = QuantizationScheme(targets=["Linear"], **NVFP4)
        mxfp4 = QuantizationScheme(targets=["Linear"], **MXFP4)

        def decompress_nvfp4(self, p, s, gs):
            return NVFP4PackedCompressor.decompress(
                {"weight_packed": p, "weight_scale": s, "weight_global_scale": gs}, self.nvfp4)["weight"]

        def dequantize_nvfp4_f32(self, p, s, gs):
            """decompress with float32 in place of its default bf16 (unpack dtype and scale dtype)."""
            x_q = unpack_fp4_from_uint8(p, p.shape[0], p.shape[1] * 2, dtype=torch.float32)
            return dequantize(x_q=x_q, scale=s.to(torch.float32), args=self.nvfp4.weights, global_scale=gs,
                              dtype=torch.float32)

        def decompress_mxfp4(self, p, s):
            return MXFP4PackedCompressor.decompress({"weight_packed": p, "weight_scale": s}, self.mxfp4)["weight"]

        def compress_nvfp4(self, w):
            """llm-compressor's min-max observer path: global scale, group qparams (in w's dtype), compress."""
            gs = generate_gparam(w.min(), w.max())
            groups = w.unflatten(-1, (-1, 16))
            scale, _ = calculate_qparams(groups.amin(-1), groups.amax(-1), self.nvfp4.weights, global_scale=gs)
            return NVFP4PackedCompressor.compress(
                {"weight": w, "weight_scale": scale, "weight_global_scale": gs}, self.nvfp4)

        def compress_mxfp4(self, w):
            groups = w.unflatten(-1, (-1, 32))
            scale, _ = calculate_qparams(groups.amin(-1), groups.amax(-1), self.mxfp4.weights)
            return MXFP4PackedCompressor.compress({"weight": w, "weight_scale": scale}, self.mxfp4)

    return CT()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ct_nvfp4_decode_is_the_library(ct, seed):
    p, s, gs = stored_nvfp4(seed=seed)
    ours = L.decode_ct_nvfp4(p, s, gs)
    assert ours.dtype == torch.float32
    assert_bits(ours, ct.dequantize_nvfp4_f32(p, s, gs))  # float32, -0.0 included
    lib = ct.decompress_nvfp4(p, s, gs)
    assert lib.dtype == torch.bfloat16
    assert_bits(ours.to(torch.bfloat16), lib)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ct_nvfp4_encode_is_the_library(ct, dtype):
    w = weights(dtype=dtype)
    lib = ct.compress_nvfp4(w)
    ours = L.encode_ct_nvfp4(w)
    assert_bits(ours["weight_global_scale"], lib["weight_global_scale"])
    assert ours["weight_scale"].dtype == lib["weight_scale"].dtype == torch.float8_e4m3fn
    assert torch.equal(ours["weight_scale"].view(torch.uint8), lib["weight_scale"].view(torch.uint8))
    assert torch.equal(ours["weight_packed"], lib["weight_packed"])
    assert (ours["weight_packed"] & 0x0F == 8).any()  # small negatives are written as -0, as the library does


def zero_scale_blocks_zeroed(p: torch.Tensor, s: torch.Tensor, block: int) -> torch.Tensor:
    """Codes of blocks whose scale is 0 -> 0 (they decode to zeros whatever the codes)."""
    zero = (s.view(torch.uint8) == 0).repeat_interleave(block // 2, dim=-1)
    return torch.where(zero, 0, p).to(torch.uint8)


def test_ct_nvfp4_round_trip():
    p, s, gs = stored_nvfp4(seed=3, lo=1)
    w = L.decode_ct_nvfp4(p, s, gs)
    again = L.encode_ct_nvfp4(w, gs, s)
    assert torch.equal(again["weight_packed"], no_negative_zero(p))
    assert again["weight_scale"] is s and again["weight_global_scale"] is gs
    # the library's own bf16 output re-encodes to the same codes too
    assert torch.equal(L.encode_ct_nvfp4(w.to(torch.bfloat16), gs, s)["weight_packed"], no_negative_zero(p))
    # a zero block scale: the block comes back as codes 0
    p0, s0, _ = stored_nvfp4(seed=3)
    assert (s0.view(torch.uint8) == 0).any()
    again = L.encode_ct_nvfp4(L.decode_ct_nvfp4(p0, s0, gs), gs, s0)["weight_packed"]
    assert torch.equal(again, zero_scale_blocks_zeroed(no_negative_zero(p0), s0, 16))
    # from the weight alone: the decoded values come back
    w2 = weights(seed=4)
    enc = L.encode_ct_nvfp4(w2)
    dec = L.decode_ct_nvfp4(**enc)
    assert_values(L.decode_ct_nvfp4(**L.encode_ct_nvfp4(dec, enc["weight_global_scale"], enc["weight_scale"])), dec)


def test_ct_nvfp4_against_the_project_scheme():
    """float32 weights: the same codes and block scales as this project's nvfp4 (a zero block's scale aside:
    0.125 there, 0 here); the dequantized values differ in the last bits, since the library multiplies by
    s8 / gs and the project by ts · s8 (ts = amax/2688, gs = 2688/amax)."""
    w = weights(seed=5)
    enc = L.encode_ct_nvfp4(w)
    ref = pack(w, L.NVFP4)
    zero_block = w.unflatten(-1, (-1, 16)).abs().amax(-1) == 0
    assert torch.equal(no_negative_zero(enc["weight_packed"]), ref.codes)
    scales = enc["weight_scale"].view(torch.uint8)
    assert torch.equal(scales[~zero_block], ref.scales[~zero_block])
    assert (enc["weight_scale"].to(torch.float32)[zero_block] == 0.125).all()
    ours, theirs = quantize_torch(w, L.NVFP4), L.decode_ct_nvfp4(**enc)
    assert torch.allclose(theirs, ours, rtol=2**-22, atol=0)
    assert (theirs != ours).any()  # not bit-identical: the two scale conventions round differently


def test_ct_nvfp4_to_packed():
    p, s, _ = stored_nvfp4(seed=6)
    for gs in (torch.tensor([2.0**-5]), torch.tensor([64.0])):  # powers of two: always exact
        packed = L.ct_nvfp4_to_packed(p, s, gs)
        assert packed.scheme == L.NVFP4 and packed.codes is p
        assert torch.equal(unpack_mx(packed), L.decode_ct_nvfp4(p, s, gs))
    found = 0
    for seed in range(40):
        gs = torch.exp2(torch.empty(1).uniform_(-4, 12, generator=torch.Generator().manual_seed(seed)))
        try:
            packed = L.ct_nvfp4_to_packed(p, s, gs)
        except ValueError as e:
            assert "exact=False" in str(e)
            packed = L.ct_nvfp4_to_packed(p, s, gs, exact=False)
            assert torch.allclose(unpack_mx(packed), L.decode_ct_nvfp4(p, s, gs), rtol=2**-22, atol=0)
            continue
        found += 1
        assert torch.equal(unpack_mx(packed), L.decode_ct_nvfp4(p, s, gs))  # as values: zeros come back +0.0
    assert found > 0


@pytest.mark.parametrize("seed", [0, 1])
def test_ct_mxfp4_decode_is_the_library(ct, seed):
    p, s = stored_mx(seed=seed, lo=0, hi=255)  # every finite E8M0 scale, 2**-127 .. 2**127
    ours = L.decode_ct_mxfp4(p, s)
    lib = ct.decompress_mxfp4(p, s)
    assert lib.dtype == torch.bfloat16
    assert_bits(ours.to(torch.bfloat16), lib)
    assert_bits(ours, lib.to(torch.float32))  # exact in bf16 already
    # 255: NaN here (OCP MX); inf in the library
    p1, s1 = p[:1], torch.full_like(s[:1], 255)
    assert L.decode_ct_mxfp4(p1, s1).isnan().all()
    assert ct.decompress_mxfp4(p1, s1).float().isinf().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ct_mxfp4_encode_is_the_library_and_the_scheme(ct, dtype):
    w = weights(seed=7, dtype=dtype)
    lib = ct.compress_mxfp4(w)
    ours = L.encode_ct_mxfp4(w)
    assert torch.equal(ours["weight_scale"], lib["weight_scale"])
    assert torch.equal(ours["weight_packed"], lib["weight_packed"])
    # the same values as this project's fake quantization with scale_mode=even (zeros compare equal as values)
    assert torch.equal(L.decode_ct_mxfp4(**ours), quantize_torch(w.float(), L.CT_MXFP4))
    assert L.CT_MXFP4.scale_mode.value == "even" and L.LAYOUTS["ct-mxfp4"].scheme == L.CT_MXFP4


def test_ct_mxfp4_round_trip_and_packed():
    p, s = stored_mx(seed=8, lo=0, hi=254)  # 254: 2**127 · (2, 3, 4, 6) overflow float32 (inf), not invertible
    w = L.decode_ct_mxfp4(p, s)
    assert torch.equal(L.encode_ct_mxfp4(w, s)["weight_packed"], no_negative_zero(p))
    w2 = weights(seed=9)
    enc = L.encode_ct_mxfp4(w2)
    dec = L.decode_ct_mxfp4(**enc)
    assert_values(L.decode_ct_mxfp4(**L.encode_ct_mxfp4(dec)), dec)  # scales re-derived from the values
    packed = L.ct_mxfp4_to_packed(p, s)
    assert packed.codes is p and packed.scales is s
    assert torch.equal(unpack_mx(packed), w)


# ------------------------------------------------------------------------------------------------------------
# ModelOpt: an explicit transcription of NVFP4QTensor (modelopt 0.40, qtensor/nvfp4_tensor.py)

_MO_VALUES = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, 0, -0.5, -1, -1.5, -2, -3, -4, -6])  # code 8: +0.0
_MO_BOUNDS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5])


def modelopt_dequantize(weight, weight_scale, weight_scale_2):
    """NVFP4QTensor.dequantize (fast=False): per_block_scale = float32(scale) * double_scale; unpack (high
    nibble = odd element); table lookup; view [..., -1, 16] * per_block_scale; reshape."""
    unpacked = torch.empty(*weight.shape[:-1], weight.shape[-1] * 2, dtype=torch.float32)
    unpacked[..., 1::2] = weight >> 4
    unpacked[..., 0::2] = weight & 0x0F
    values = _MO_VALUES[unpacked.long()]
    per_block_scale = weight_scale.to(torch.float32) * weight_scale_2
    out = values.view(*values.shape[:-1], -1, 16) * per_block_scale.unsqueeze(-1)
    return out.reshape(values.shape)


def modelopt_quantize(w):
    """NVFP4QTensor.quantize (no TensorRT-LLM): scale_2 = amax.float() / (6 * 448); per-block scale =
    block_amax.float() / (6 * scale_2), 0 -> 1, to float8_e4m3fn; scaled = w / (scale.float() * scale_2);
    _cast_fp4: sign = w < 0, searchsorted over the bounds, +1 at the bounds 0.75, 1.75, 3.5; pack."""
    scale_2 = w.abs().amax().float() / (6.0 * 448.0)
    amax = w.unflatten(-1, (-1, 16)).abs().amax(-1).float()
    scale = amax / (6.0 * scale_2)
    scale[scale == 0] = 1.0
    scale = scale.to(torch.float8_e4m3fn)
    scaled = (w.unflatten(-1, (-1, 16)) / (scale.to(torch.float32) * scale_2).unsqueeze(-1)).flatten(-2)
    sign = (scaled < 0).to(torch.uint8)
    a = scaled.abs()
    ordinal = torch.searchsorted(_MO_BOUNDS, a.contiguous(), out_int32=True).to(torch.uint8)
    odd = torch.any(a.unsqueeze(-1) == _MO_BOUNDS[[1, 3, 5]], dim=-1).to(torch.uint8)
    q = (sign << 3) + ordinal + odd
    return {"weight": (q[..., 1::2] << 4) | q[..., 0::2], "weight_scale": scale, "weight_scale_2": scale_2}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_modelopt_nvfp4_decode_is_modelopt(seed):
    p, s, gs = stored_nvfp4(seed=seed)
    ts = 1.0 / gs.reshape(())  # ModelOpt stores a 0-dim divisor
    assert_bits(L.decode_modelopt_nvfp4(p, s, ts), modelopt_dequantize(p, s, ts))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_modelopt_nvfp4_encode_is_modelopt_and_the_scheme(dtype):
    w = weights(seed=10, dtype=dtype)
    w[0, 0], w[0, 1], w[0, 2] = -0.0, 1e-30, -1e-30  # signs of zero
    ref = modelopt_quantize(w)
    ours = L.encode_modelopt_nvfp4(w)
    assert_bits(ours["weight_scale_2"], ref["weight_scale_2"])
    assert torch.equal(ours["weight_scale"].view(torch.uint8), ref["weight_scale"].view(torch.uint8))
    assert torch.equal(ours["weight"], ref["weight"])
    # weight_scale_2 is this project's tensor scale; on this data the values are the project's nvfp4 exactly
    assert_bits(ours["weight_scale_2"], tensor_scale(w.float().abs().amax(), L.FP4)[0])
    project = pack(w, L.NVFP4)
    zero_block = w.unflatten(-1, (-1, 16)).abs().amax(-1) == 0
    assert torch.equal(ours["weight_scale"].view(torch.uint8)[~zero_block], project.scales[~zero_block])
    assert (ours["weight_scale"].to(torch.float32)[zero_block] == 1.0).all()
    mine, theirs = nibbles(no_negative_zero(project.codes)), nibbles(no_negative_zero(ours["weight"]))
    if dtype == torch.float32:  # on this data: the same values as this project's nvfp4
        assert torch.equal(L.decode_modelopt_nvfp4(**ours), quantize_torch(w, L.NVFP4))
        assert torch.equal(mine, theirs)
    else:
        # bf16 weights sit on exact E2M1 midpoints now and then; w / (s8·ts) (ModelOpt) and w · ((1/ts)/s8) (here)
        # round them to the two sides: one step apart, on a few elements
        differ = mine != theirs
        assert 0 < int(differ.sum()) <= 8
        assert ((mine[differ] & 7) - (theirs[differ] & 7)).abs().eq(1).all() and torch.equal(
            mine[differ] >> 3, theirs[differ] >> 3)


def test_the_transcription_is_modelopt():
    """Runs where nvidia-modelopt is installed (not beside this project's pins; checked with modelopt 0.47.0)."""
    nvfp4_tensor = pytest.importorskip("modelopt.torch.quantization.qtensor.nvfp4_tensor")
    for dtype in (torch.float32, torch.bfloat16):
        w = weights(seed=10, dtype=dtype)
        qt, s, s2 = nvfp4_tensor.NVFP4QTensor.quantize(w.clone(), 16)
        ours = L.encode_modelopt_nvfp4(w)
        assert torch.equal(qt._quantized_data, ours["weight"])
        assert torch.equal(s.view(torch.uint8), ours["weight_scale"].view(torch.uint8))
        assert_bits(s2, ours["weight_scale_2"])
    p, s, gs = stored_nvfp4(seed=1)
    ts = 1.0 / gs.reshape(())
    qt = nvfp4_tensor.NVFP4QTensor(torch.Size((p.shape[0], p.shape[1] * 2)), torch.float32, p)
    assert_bits(qt.dequantize(dtype=torch.float32, scale=s, double_scale=ts, block_sizes={-1: 16}),
                L.decode_modelopt_nvfp4(p, s, ts))


def test_modelopt_nvfp4_round_trip_and_packed():
    p, s, gs = stored_nvfp4(seed=11)
    ts = 1.0 / gs
    w = L.decode_modelopt_nvfp4(p, s, ts)
    assert torch.equal(L.encode_modelopt_nvfp4(w, ts, s)["weight"], zero_scale_blocks_zeroed(no_negative_zero(p), s, 16))
    packed = L.modelopt_nvfp4_to_packed(p, s, ts)
    assert packed.scheme == L.NVFP4 and packed.codes is p
    # bit for bit: the same float32 order (unpack_mx turns the -0.0 of products that underflow into +0.0)
    assert_values(unpack_mx(packed), w)


# ------------------------------------------------------------------------------------------------------------
# The two per-tensor conventions: compressed-tensors multiplies by 1/gs, ModelOpt by scale_2 (vLLM #35733)


def test_global_scale_conventions_are_reciprocal_and_not_interchangeable():
    w = weights(seed=12)
    ct_t = L.encode_ct_nvfp4(w)
    mo_t = L.encode_modelopt_nvfp4(w)
    gs, ts = ct_t["weight_global_scale"], mo_t["weight_scale_2"]
    assert gs.item() > 1 > ts.item() and abs(gs.item() * ts.item() - 1) < 1e-6
    right = L.decode_ct_nvfp4(**ct_t)
    # mixing them up: a CT global scale read as ModelOpt's weight_scale_2, and the reverse
    wrong = L.decode_modelopt_nvfp4(ct_t["weight_packed"], ct_t["weight_scale"], gs)
    assert not torch.allclose(wrong, right, rtol=1e-2)
    ratio = (wrong[right != 0] / right[right != 0]).median().item()
    assert ratio == pytest.approx(gs.item() ** 2, rel=1e-5)
    wrong2 = L.decode_ct_nvfp4(mo_t["weight"], mo_t["weight_scale"], ts.reshape(1))
    assert not torch.allclose(wrong2, right, rtol=1e-2)
    # converted properly (ModelOpt -> CT: weight_global_scale = 1 / weight_scale_2) they agree to float32 rounding
    converted = L.decode_ct_nvfp4(mo_t["weight"], mo_t["weight_scale"], (1.0 / ts).reshape(1))
    assert torch.allclose(converted, L.decode_modelopt_nvfp4(**mo_t), rtol=2**-21, atol=0)


# ------------------------------------------------------------------------------------------------------------
# gpt-oss (transformers)


def test_gptoss_decode_is_transformers():
    mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")
    g = torch.Generator().manual_seed(13)
    blocks = torch.randint(0, 256, (3, 8, 4, 16), generator=g, dtype=torch.uint8)  # [E, N, K/32, 16]
    scales = torch.randint(0, 255, (3, 8, 4), generator=g, dtype=torch.uint8)
    ours = L.decode_gptoss_mxfp4(blocks, scales)
    assert ours.shape == (3, 8, 128)
    for dtype in (torch.float32, torch.bfloat16):
        lib = mxfp4.convert_moe_packed_tensors(blocks, scales, dtype=dtype)  # [E, K, N]
        assert lib.shape == (3, 128, 8)
        assert_bits(ours.transpose(-1, -2).to(dtype), lib)
    one = torch.full_like(scales[:1], 255)
    assert L.decode_gptoss_mxfp4(blocks[:1], one).isnan().all()  # 255: NaN here; transformers: inf
    assert mxfp4.convert_moe_packed_tensors(blocks[:1], one, dtype=torch.float32).isinf().any()


@pytest.mark.parametrize("mode", ["floor", "even", "rceil"])
def test_gptoss_encode_round_trip_and_packed(mode):
    import dataclasses

    scheme = dataclasses.replace(L.MXFP4, scale_mode=L.ScaleMode(mode))
    w = weights((2, 16, 128), seed=14)
    enc = L.encode_gptoss_mxfp4(w, scheme)
    assert enc["blocks"].shape == (2, 16, 4, 16) and enc["scales"].shape == (2, 16, 4)
    dec = L.decode_gptoss_mxfp4(**enc)
    assert torch.equal(dec, quantize_torch(w, scheme))
    assert_values(L.decode_gptoss_mxfp4(**L.encode_gptoss_mxfp4(dec, scheme, enc["scales"])), dec)
    assert_values(L.decode_gptoss_mxfp4(**L.encode_gptoss_mxfp4(dec, scheme)), dec)  # scales re-derived
    packed = L.gptoss_mxfp4_to_packed(enc["blocks"], enc["scales"], scheme)
    assert packed.shape == (2, 16, 128) and packed.scheme == scheme
    assert torch.equal(unpack_mx(packed), dec)


# ------------------------------------------------------------------------------------------------------------
# The table, and errors


def test_layout_table():
    assert set(L.LAYOUTS) == {"ct-nvfp4", "ct-mxfp4", "ct-mxfp8", "modelopt-nvfp4", "gptoss-mxfp4", "ar-mxfp4",
                              "ar-nvfp4", "quark-mxfp4", "quark-mxfp6-e2m3", "quark-mxfp6-e3m2", "quark-nvfp4"}
    assert L.get_layout("CT_NVFP4") is L.LAYOUTS["ct-nvfp4"]
    assert [lay.name for lay in L.LAYOUTS.values() if not lay.exact_scale_order] == ["ct-nvfp4", "ar-nvfp4"]
    for lay in L.LAYOUTS.values():
        assert lay.decode.__doc__ and "Decoding" in lay.decode.__doc__
    p, s, gs = stored_nvfp4(seed=15)
    lay = L.LAYOUTS["modelopt-nvfp4"]
    assert_bits(lay.decode_dict({"weight": p, "weight_scale": s, "weight_scale_2": gs, "input_scale": gs}),
                L.decode_modelopt_nvfp4(p, s, gs))
    assert lay.to_packed_dict({"weight": p, "weight_scale": s, "weight_scale_2": gs}).tensor_scale is not None
    with pytest.raises(ValueError, match=r"missing tensor\(s\) \['weight_scale_2'\]"):
        lay.decode_dict({"weight": p, "weight_scale": s})
    with pytest.raises(ValueError, match="unknown packed layout"):
        L.get_layout("awq")


def test_stacked_experts_per_expert_scale():
    p, s, _ = stored_nvfp4((16, 64), seed=16)
    p3, s3 = torch.stack([p, p]), torch.stack([s, s])
    ts = torch.tensor([0.5, 0.25])
    out = L.decode_modelopt_nvfp4(p3, s3, ts)
    assert_bits(out[1], L.decode_modelopt_nvfp4(p, s, ts[1:]))
    assert_values(unpack_mx(L.modelopt_nvfp4_to_packed(p3, s3, ts)), out)
    gs = torch.tensor([[2.0], [0.125]])  # compressed-tensors, one global scale per expert, powers of two
    out = L.decode_ct_nvfp4(p3, s3, gs)
    assert_bits(out[1], L.decode_ct_nvfp4(p, s, gs[1]))
    assert_values(unpack_mx(L.ct_nvfp4_to_packed(p3, s3, gs)), out)


def test_errors():
    p, s, gs = stored_nvfp4()
    with pytest.raises(ValueError, match=r"weight_packed: expected dtype torch.uint8, got torch.int8"):
        L.decode_ct_nvfp4(p.view(torch.int8), s, gs)
    with pytest.raises(ValueError, match=r"weight_scale: expected dtype torch.float8_e4m3fn, got torch.uint8"):
        L.decode_ct_nvfp4(p, s.view(torch.uint8), gs)
    with pytest.raises(ValueError, match=r"weight_scale: expected shape \(24, 8\) .*got \(24, 7\)"):
        L.decode_ct_nvfp4(p, s[:, :7], gs)
    with pytest.raises(ValueError, match=r"weight_global_scale: expected one float32 value"):
        L.decode_ct_nvfp4(p, s, torch.ones(3))
    with pytest.raises(ValueError, match=r"weight_global_scale: expected dtype torch.float32, got torch.bfloat16"):
        L.decode_ct_nvfp4(p, s, gs.bfloat16())
    with pytest.raises(ValueError, match=r"weight: 60 elements per row .* not a multiple of the block of 16"):
        L.decode_modelopt_nvfp4(p[:, :30], s[:, :4], gs)
    with pytest.raises(ValueError, match=r"weight_scale_2: expected a torch.Tensor of dtype torch.float32, got float"):
        L.decode_modelopt_nvfp4(p, s, 0.5)
    pm, sm = stored_mx()
    with pytest.raises(ValueError, match=r"weight_scale: expected dtype torch.uint8, got torch.float8_e4m3fn"):
        L.decode_ct_mxfp4(pm, sm.view(torch.float8_e4m3fn))
    with pytest.raises(ValueError, match=r"weight_scale: expected shape \(24, 4\) .*got \(24, 8\)"):
        L.decode_ct_mxfp4(pm, s.view(torch.uint8))  # NVFP4's scales given to MXFP4
    with pytest.raises(ValueError, match=r"blocks: expected shape \[..., N, K/32, 16\]"):
        L.decode_gptoss_mxfp4(pm.reshape(24, 8, 8), sm)
    with pytest.raises(ValueError, match=r"scales: expected shape \(24, 4\) .*got \(24, 2\)"):
        L.decode_gptoss_mxfp4(pm.reshape(24, 4, 16), sm[:, :2])
    with pytest.raises(ValueError, match=r"blocks: expected at least 3 dimensions"):
        L.decode_gptoss_mxfp4(pm, sm)
    with pytest.raises(ValueError, match=r"weight: expected shape \[..., N, K\] with K a multiple of 16"):
        L.encode_ct_nvfp4(torch.ones(4, 24))
    with pytest.raises(ValueError, match=r"weight: expected a float32, bfloat16 or float16 tensor"):
        L.encode_ct_mxfp4(torch.ones(4, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"weight_scale: expected shape \(4, 4\)"):
        L.encode_modelopt_nvfp4(torch.ones(4, 64), torch.tensor(1.0), torch.ones(4, 3).to(torch.float8_e4m3fn))
    with pytest.raises(ValueError, match=r"scheme: expected fp4_e2m1 with block 32"):
        L.encode_gptoss_mxfp4(torch.ones(4, 64), L.NVFP4)

"""Block Hadamard rotations: orthogonality, the fixed butterfly arithmetic, layers that equal their originals
without quantization, per-role selection, attention Q/K, and errors naming layers and sizes."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from conftest import ARCHS, tiny_model

from lm_eval_mx.nn import layers
from lm_eval_mx.nn.layers import mx_layers
from lm_eval_mx.numerics.quantize import quantize
from lm_eval_mx.numerics.rotation import Rotation, block_for, hadamard, norm_scale, rotate, signs
from lm_eval_mx.selection.apply import SelectionError, apply_mx
from lm_eval_mx.selection.config import parse_mx_args

IDS = torch.tensor([[3, 17, 42, 99, 5, 64, 7, 120, 33, 2, 11, 80]])


@pytest.mark.parametrize("n", [1, 2, 4, 16, 32, 128])
def test_sylvester_matrix_is_orthogonal(n):
    h = hadamard(n)
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))
    if n >= 2:  # H_2n = [[H_n, H_n], [H_n, -H_n]]
        half = hadamard(n // 2)
        assert torch.equal(h, torch.cat([torch.cat([half, half], 1), torch.cat([half, -half], 1)], 0))


def _numpy_rotate(x: np.ndarray, block: int, seed: int | None) -> np.ndarray:
    """docs/numerics.md's arithmetic in numpy float32: signs, butterflies h = 1, 2, ... (a + b, a - b), then 1/sqrt(n)."""
    x = x.astype(np.float32).copy()
    if seed is not None:
        x *= signs(seed, x.shape[-1]).numpy()
    y = x.reshape(-1, block).copy()
    h = 1
    while h < block:
        for start in range(0, block, 2 * h):
            a, b = y[:, start : start + h].copy(), y[:, start + h : start + 2 * h].copy()
            y[:, start : start + h], y[:, start + h : start + 2 * h] = a + b, a - b
        h *= 2
    return (y * np.float32(norm_scale(block))).reshape(x.shape)


@pytest.mark.parametrize("block, seed", [(16, None), (32, 7), (0, None), (64, 3)])
def test_arithmetic_is_the_defined_butterfly_order(block, seed):
    g = torch.Generator().manual_seed(block)
    x = torch.randn(5, 192 if block else 256, generator=g) * torch.logspace(-3, 3, 5).unsqueeze(1)
    rot = Rotation(block, seed)
    got = rotate(x, rot)
    b = rot.block_for(x.shape[-1])
    assert np.array_equal(got.numpy().view(np.uint32), _numpy_rotate(x.numpy(), b, seed).view(np.uint32))
    # and it is x @ diag(s) @ blockdiag(H/sqrt(n)) up to float32 rounding
    s = signs(seed, x.shape[-1]).double() if seed is not None else torch.ones(x.shape[-1], dtype=torch.float64)
    h = torch.block_diag(*[hadamard(b) / math.sqrt(b)] * (x.shape[-1] // b))
    exact = (x.double() * s) @ h
    assert (got.double() - exact).abs().max() <= 1e-6 * exact.abs().max()


def test_rotation_preserves_products_and_bf16_inputs():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(8, 256, generator=g), torch.randn(32, 256, generator=g)
    for rot in (Rotation(32), Rotation(32, 11), Rotation(0, 5)):
        y = rotate(x, rot) @ rotate(w, rot).T
        assert torch.allclose(y, x @ w.T, rtol=0, atol=1e-4)
    xb = x.to(torch.bfloat16)
    assert rotate(xb, Rotation(32)).dtype == torch.float32  # rotated in float32, never rounded to bf16
    assert torch.equal(rotate(xb, Rotation(32)), rotate(xb.float(), Rotation(32)))
    assert torch.equal(rotate(w.T, Rotation(16), axis=0), rotate(w, Rotation(16)).T)  # along any axis


def test_signs_are_reproducible_and_seeded():
    assert torch.equal(signs(3, 64), signs(3, 64)) and not torch.equal(signs(3, 64), signs(4, 64))
    assert set(signs(3, 64).tolist()) == {-1.0, 1.0}
    g = torch.Generator().manual_seed(3)
    assert torch.equal(signs(3, 64), (torch.randint(0, 2, (64,), generator=g) * 2 - 1).float())


def test_full_dimension_block():
    assert block_for(4096, 0) == 4096 and block_for(14336, 0) == 2048 and block_for(576, 0) == 64
    with pytest.raises(ValueError, match="rotation block 64 does not divide the reduction dimension 96"):
        Rotation(64).block_for(96)
    with pytest.raises(ValueError, match="power of two"):
        Rotation(24)


def _identity_quantizer(monkeypatch):
    """Quantization switched off (rotation kept): x or W rotated along the axis, back in its dtype."""
    def q(x, scheme, axis, rotation=None):
        return x if rotation is None else rotate(x, rotation, axis).to(x.dtype)

    monkeypatch.setattr(layers.MXSpec, "quantizer", property(lambda self: q))
    monkeypatch.setattr(layers.MXSpec, "act_quantizer", property(lambda self: lambda x: q(x, self.a, -1, self.rotation)))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("rotation", [{}, {"rotation_seed": 9}, {"rotation_block": 0}])
def test_rotated_layers_equal_originals_without_quantization(arch, rotation, monkeypatch):
    """Orthogonality end to end on every seed architecture (dense, GPT-2 Conv1D, Phi-3 fused, Mixtral experts)."""
    _identity_quantizer(monkeypatch)
    base = tiny_model(arch)
    model = copy.deepcopy(base)
    report = apply_mx(model, parse_mx_args({"format": "fp4", "rotation": "hadamard", **rotation})[0])
    assert report.replaced and all(e.rotation for e in report.replaced)
    with torch.no_grad():
        ref, out = base(IDS).logits, model(IDS).logits
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_rotation_roles_and_report():
    model = tiny_model("llama")
    report = apply_mx(model, parse_mx_args({"format": "fp4", "rotation": "hadamard", "rotation_roles": "mlp_down"})[0])
    rotated = {e.name for e in report.replaced if e.rotation}
    assert rotated == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    assert {e.rotation for e in report.replaced if e.rotation} == {"H32"}
    assert report.summary()["layers_per_rotation"] == {"H32": 2}
    assert all(m.mx_spec.rotation is None for n, m in mx_layers(model) if n not in rotated)
    # the default block is the quantization block: 16 for NVFP4
    report = apply_mx(tiny_model("llama"), parse_mx_args({"format": "nvfp4", "rotation": "hadamard"})[0])
    assert {e.rotation for e in report.replaced} == {"H16"}


def test_full_rotation_falls_back_to_the_largest_power_of_two_block_and_says_so():
    model = tiny_model("llama")  # hidden 64 (a power of two), intermediate 96 (= 32 * 3)
    report = apply_mx(model, parse_mx_args({"format": "fp4", "rotation": "hadamard", "rotation_block": 0})[0])
    rot = {e.name.rsplit(".", 1)[-1]: e.rotation for e in report.replaced}
    assert rot["q_proj"] == "H64" and rot["down_proj"] == "H32"
    assert any("rotation_block=0 uses H32" in n and "mlp.down_proj" in n for n in report.notes)


def test_rotation_errors_name_the_layer_and_sizes():
    with pytest.raises(SelectionError, match=r"model.layers.0.self_attn.q_proj \(weight\): rotation block 128 does "
                                             r"not divide the reduction dimension 64"):
        apply_mx(tiny_model("llama"), parse_mx_args({"format": "fp4", "rotation": "hadamard", "rotation_block": 128})[0])
    with pytest.raises(ValueError, match="rotation_block defaults to the block size, 24, which is not a power of two"):
        parse_mx_args({"format": "fp4", "block_size": 24, "rotation": "hadamard"})  # before any model


def test_attention_q_k_rotated_along_the_head_dimension():
    """Q and K rotated by the same H along the head dimension before quantization; P and V as without rotation."""
    from test_attention import _eager_mask, _Module

    from lm_eval_mx.nn import attention
    from lm_eval_mx.nn.spec import MXSpec

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 24, 16, generator=g) for _ in range(3))
    mask = _eager_mask(20, 24)
    spec = MXSpec.make("fp4_e2m1", "fp4_e2m1", block_size=16, rotation=Rotation(16, 2))
    mod = _Module()
    attention._STATES[id(mod.config)] = attention._State(spec, True, "sdpa")
    try:
        out, probs = attention.mx_attention_forward(mod, q, k, v, mask, scaling=0.25)
    finally:
        attention._STATES.pop(id(mod.config))
    a, rot = spec.a, spec.rotation
    s = quantize(q, a, -1, rot) @ quantize(k, a, -1, rot).transpose(2, 3) * 0.25 + mask
    p = torch.softmax(s, -1)
    vv = v.clone()
    vv[1, :, 20:] = 0  # keys nobody attends
    assert torch.equal(probs, p)
    assert torch.equal(out, (quantize(p, a) @ quantize(vv, a, -2)).transpose(1, 2))
    model = tiny_model("llama")  # through apply_mx: the rotation reaches the attention spec
    apply_mx(model, parse_mx_args({"roles": "none", "attn_bmm": True, "format": "fp4", "rotation": "hadamard",
                                   "rotation_block": 16})[0])
    assert attention._STATES[id(model.config)].spec.rotation == Rotation(16)


def test_attention_rotation_block_must_divide_head_dim():
    with pytest.raises(SelectionError, match=r"attn_bmm \(Q, K\) \(head_dim\): rotation block 32 does not divide"):
        apply_mx(tiny_model("llama"), parse_mx_args({"roles": "none", "attn_bmm": True, "format": "fp4",
                                                     "rotation": "hadamard"})[0])


def test_weight_only_rotation_rounds_the_rotated_input_to_its_dtype():
    model = tiny_model("llama", dtype=torch.bfloat16)
    original = copy.deepcopy(model)
    apply_mx(model, parse_mx_args({"format": "fp4", "weight_only": True, "rotation": "hadamard"})[0])
    layer = dict(mx_layers(model))["model.layers.0.mlp.down_proj"]
    before = dict(original.named_modules())["model.layers.0.mlp.down_proj"].weight
    assert torch.equal(layer.weight, quantize(before, layer.mx_spec.w, -1, Rotation(32)))  # stored rotated
    x = torch.randn(3, 96).to(torch.bfloat16)
    want = torch.nn.functional.linear(rotate(x, Rotation(32)).to(torch.bfloat16), layer.weight)
    assert torch.equal(layer(x), want)

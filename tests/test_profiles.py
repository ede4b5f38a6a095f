"""profile=NAME: each stack's numerics pinned against the stack's own code, one test per step.

torchao and compressed-tensors run here (test dependencies); auto-round and AMD Quark ran in their own venvs and
wrote their outputs on fixed inputs (tests/data/profiles/make_*.py, kilobytes); microxcaling's are the golden
cases. Each test takes the scheme from ``profile=`` as a user would, so a wrong profile key fails it.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from lm_eval_mx.algorithms.divergence import agreement
from lm_eval_mx.numerics import runtimes as R
from lm_eval_mx.numerics.formats import FORMATS, E4M3Steps
from lm_eval_mx.numerics.profiles import PAIRS, PROFILES, ProfileRefusal, Rule, get_profile
from lm_eval_mx.numerics.quantize import make_scheme, quantize
from lm_eval_mx.selection.config import parse_mx_args

DATA = Path(__file__).parent / "data"


def scheme(profile: str, fmt: str):
    config, _ = parse_mx_args({"profile": profile, "format": fmt})
    return config.scheme(config.w_format)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-equal up to the sign of zero (the stacks return -0.0 where hf-mx returns +0.0)."""
    a, b = a.float() + 0.0, b.float() + 0.0
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num().view(torch.int32),
                                                               b.nan_to_num().view(torch.int32))


def data(seed: int, rows: int = 16, cols: int = 128) -> torch.Tensor:
    """Rows spanning 1e-4..1e4, and one 16-block 2**-16 smaller than its row (an E4M3-subnormal NVFP4 scale)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.logspace(-4, 4, rows).unsqueeze(1)
    x[-1, :16] *= 2.0**-16
    return x


# ---------------------------------------------------------------------------------------------------- torchao


def _torchao(module: str):
    return pytest.importorskip(f"torchao.prototype.mx_formats.{module}", reason="torchao not installed")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torchao_nvfp4_is_torchaos_nvfp4_quantize(dtype):
    """profile=torchao, format=nvfp4: bit-exact with torchao's NVFP4Tensor (dynamic per-tensor scale), the
    [2**-6, 448] scale clamp included: the reference steps differ on clamped blocks (the small block and the
    smallest rows), not on the large rows."""
    nv = _torchao("nvfp4_tensor")
    x = data(0).to(dtype)
    ts = nv.per_tensor_amax_to_scale(x.float().abs().amax())
    theirs = nv.NVFP4Tensor.to_nvfp4(x, 16, per_tensor_scale=ts).dequantize(dtype)
    assert same(quantize(x, scheme("torchao", "nvfp4")), theirs)
    unclamped = quantize(x, replace(scheme("torchao", "nvfp4"), e4m3_steps=E4M3Steps.REFERENCE))
    assert not same(unclamped[-1, :16], theirs[-1, :16]) and same(unclamped[-4:-1], theirs[-4:-1])


def test_torchao_nvfp4_single_level_clamp():
    """The clamp step without a per-tensor scale (torchao's single-level path): small blocks take scale 2**-6."""
    nv = _torchao("nvfp4_tensor")
    x = data(1) * 1e-3
    theirs = nv.NVFP4Tensor.to_nvfp4(x, 16).dequantize(torch.float32)
    single = make_scheme("fp4", 16, scale_format="e4m3")
    assert same(quantize(x, replace(single, e4m3_steps=E4M3Steps.CLAMP)), theirs)
    assert not same(quantize(x, single), theirs)


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8"])
def test_torchao_mx_is_torchaos_default_rceil(fmt):
    """profile=torchao, MX: torchao's inference config's own default scaling mode, bit-exact with MXTensor.to_mx."""
    mx = _torchao("mx_tensor")
    from torchao.prototype.mx_formats.inference_workflow import MXDynamicActivationMXWeightConfig

    mode = MXDynamicActivationMXWeightConfig().scaling_mode
    assert scheme("torchao", fmt).scale_mode.value == mode.value
    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, 128, generator=g) * torch.logspace(-3, 3, 16).unsqueeze(1)
    dtype = torch.float4_e2m1fn_x2 if fmt == "mxfp4" else torch.float8_e4m3fn
    theirs = mx.MXTensor.to_mx(x, dtype, 32, scaling_mode=mode).dequantize(torch.float32)
    assert same(quantize(x, scheme("torchao", fmt)), theirs)
    assert not same(quantize(x, scheme("ocp", fmt)), theirs)  # floor scales differ: the profile is what matches


# -------------------------------------------------------------------------------------------- compressed-tensors


def _ct_forward(preset: str, x: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' own forward QDQ of a layer input under an llm-compressor preset (dynamic scales; for
    NVFP4 the input_global_scale generate_gparam makes from this input's amax)."""
    pytest.importorskip("compressed_tensors", minversion="0.20")
    from compressed_tensors.quantization import QuantizationScheme, QuantizationStatus, quant_scheme
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize
    from compressed_tensors.quantization.utils import generate_gparam

    args = QuantizationScheme(targets=["Linear"], **getattr(quant_scheme, preset)).input_activations
    m = torch.nn.Linear(x.shape[-1], 4)
    m.quantization_status = QuantizationStatus.FROZEN
    if preset == "NVFP4":
        amax = x.float().abs().amax().reshape(1)
        m.input_global_scale = torch.nn.Parameter(generate_gparam(-amax, amax), requires_grad=False)
    return forward_quantize(m, x, "input", args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", range(3))
def test_compressed_tensors_nvfp4_is_its_forward(dtype, seed):
    """profile=compressed-tensors, nvfp4 (e4m3_steps=divide): bit-exact with compressed-tensors' forward_quantize,
    bmax / 6 in the input dtype included; hf-mx's reference steps are not (the order of the global and block
    scales)."""
    x = data(seed).to(dtype)
    theirs = _ct_forward("NVFP4", x)
    assert same(quantize(x, scheme("compressed-tensors", "nvfp4")), theirs)
    if dtype == torch.float32:
        assert not same(quantize(x, replace(scheme("compressed-tensors", "nvfp4"), e4m3_steps=E4M3Steps.REFERENCE)),
                        theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compressed_tensors_mxfp4_is_its_forward(dtype):
    """profile=compressed-tensors, mxfp4: its dynamic activation QDQ (round_to_power_2 'even' scales), bit-exact."""
    x = data(4).to(dtype)
    theirs = _ct_forward("MXFP4", x)
    assert same(quantize(x, scheme("compressed-tensors", "mxfp4")), theirs)
    assert not same(quantize(x, scheme("auto-round", "mxfp4")), theirs)


# ------------------------------------------------------------------------ microxcaling, auto-round, AMD Quark


def test_ocp_is_microxcaling_defaults_on_the_golden_cases():
    """profile=ocp: microxcaling's MxSpecs defaults (round='nearest', floor scales), on every golden case of that
    rounding at block 32 for MXFP4 and MXFP8."""
    golden = np.load(DATA / "microxcaling_mx_golden.npz")
    cases = [c for c in json.loads(bytes(golden["index_json"]).decode()) if c["round"] == "nearest"
             and c["block_size"] == 32 and c["scale_bits"] == 8 and c["elem_format"] in ("fp4_e2m1", "fp8_e4m3")]
    assert len(cases) >= 8
    for c in cases:
        x = torch.from_numpy(golden[c["input"]])
        x = x.to(torch.bfloat16) if c["dtype"] == "bfloat16" else x
        fmt = "mxfp4" if c["elem_format"] == "fp4_e2m1" else "mxfp8"
        out = quantize(x, scheme("ocp", fmt), axis=c["axis"]).float().numpy()
        assert np.array_equal(np.isnan(out), np.isnan(golden[c["key"]])), c["key"]
        assert np.array_equal(np.nan_to_num(out).view(np.uint32), np.nan_to_num(golden[c["key"]]).view(np.uint32)), \
            c["key"]


def _written(name: str) -> dict:
    return torch.load(DATA / "profiles" / name, weights_only=True)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8"])
def test_auto_round_is_its_quant_mx(dtype, fmt):
    """profile=auto-round: auto-round 0.16.1's quant_mx (written in its venv), bit-exact."""
    w = _written("autoround_mx.pt")
    ours = quantize(w[f"in/{dtype}"], scheme("auto-round", fmt))
    assert same(ours, w[f"out/{dtype}/mx_{fmt[2:]}"])


@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8"])
def test_auto_round_log2_edge_is_its_quant_mx(fmt):
    """Where auto-round's torch.log2 rounds a block maximum just below a power of two up to it (4·(2 - 2**-23)), its
    scale is twice OCP's floor: profile=auto-round (scale_mode=log2) takes auto-round's, bit for bit, as the auto-round
    checkpoint reader's activation rule does (numerics.runtimes.autoround_mx)."""
    w = _written("autoround_mx.pt")
    x, theirs = w["in/edge"], w[f"out/edge/mx_{fmt[2:]}"]
    assert same(quantize(x, scheme("auto-round", fmt)), theirs)
    assert same(R.autoround_mx(x, FORMATS[{"mxfp4": "fp4_e2m1", "mxfp8": "fp8_e4m3"}[fmt]]), theirs)
    if fmt == "mxfp4":  # OCP: scale 2**(2-2)=1 saturates at 6; auto-round: scale 2
        assert quantize(x, scheme("ocp", fmt))[0, 0] == 6.0 and theirs[0, 0] == 8.0


def test_auto_round_profile_runs_its_own_exports_only():
    ar = get_profile("auto-round")
    assert ar.version == 2
    assert ar.checkpoint("ar-mxfp4", "dynamic") == ar.checkpoint("ar-nvfp4", "static") == "checkpoint"
    with pytest.raises(ProfileRefusal, match="does not tell apart"):
        ar.checkpoint("ct-mxfp8", "dynamic")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp8"])
def test_quark_is_its_fake_quantize_mx(dtype, fmt):
    """profile=quark: AMD Quark 0.13's fake_quantize_mx, scale_calculation_mode='even' (written in its venv)."""
    w = _written("quark_mx.pt")
    ours = quantize(w[f"in/{dtype}"], scheme("quark", fmt))
    assert same(ours, w[f"out/{dtype}/{'fp4' if fmt == 'mxfp4' else 'fp8_e4m3'}"])


# ------------------------------------------------------------------------------------- keys, refusals, records


def test_every_profile_answers_every_pair_with_steps_and_source():
    for p in PROFILES.values():
        assert p.source and p.stack and p.layers and p.version >= 1
        for pair in PAIRS:
            rule = p.rules[pair]
            assert (isinstance(rule, Rule) and rule.steps) or (isinstance(rule, str) and rule), (p.name, pair)


def test_conflicting_key_names_both():
    with pytest.raises(ValueError, match=r"profile=torchao sets scale_mode=rceil .*scale_mode=floor was given"):
        parse_mx_args({"profile": "torchao", "format": "mxfp4", "scale_mode": "floor"})
    with pytest.raises(ValueError, match=r"profile=compressed-tensors quantizes roles=all .*mlp_only=True was given"):
        parse_mx_args({"profile": "ct", "format": "mxfp4", "mlp_only": True})
    with pytest.raises(ValueError, match=r"profile=ocp fixes the numerics of mxfp4 .*block_size=16 would change"):
        parse_mx_args({"profile": "ocp", "format": "mxfp4", "block_size": 16})
    with pytest.raises(ValueError, match=r"profile=torchao reproduces .*rotation"):
        parse_mx_args({"profile": "torchao", "format": "mxfp4", "rotation": "hadamard"})
    config, _ = parse_mx_args({"profile": "torchao", "format": "mxfp4", "scale_mode": "RCEIL"})  # the same: fine
    assert config.scale_mode == "rceil"


def test_refusals_carry_the_stacks_reason():
    with pytest.raises(ProfileRefusal, match="matching input/weight dtypes"):
        parse_mx_args({"profile": "torchao", "w_format": "mxfp4", "a_format": "mxfp8"})
    with pytest.raises(ProfileRefusal, match="E8M0 scales"):
        parse_mx_args({"profile": "microxcaling", "format": "nvfp4"})
    with pytest.raises(ProfileRefusal, match="not transcribed"):
        parse_mx_args({"profile": "trtllm", "format": "mxfp4"})
    with pytest.raises(ValueError, match=r"unknown profile .vlm-hopper.*did you mean vllm-hopper"):
        parse_mx_args({"profile": "vlm-hopper", "format": "nvfp4"})
    hopper = get_profile("vllm-hopper")
    assert hopper.checkpoint("ct-nvfp4", "static") == "weight_only"
    # a static NVFP4 checkpoint runs compressed-tensors' own steps (test_tool_fixtures: its logits bit for bit)
    assert get_profile("compressed-tensors").checkpoint("ct-nvfp4", "static") == "checkpoint"
    with pytest.raises(ProfileRefusal, match="input_global_scale"):
        get_profile("vllm-blackwell").checkpoint("ct-nvfp4", "static")


def test_vllm_hopper_drops_activations_and_records_its_version():
    config, _ = parse_mx_args({"profile": "vllm-hopper", "format": "nvfp4"})
    assert config.weight_only and config.formats_for("mlp_up", "x") == ("nvfp4", None)
    assert config.scheme("nvfp4").e4m3_steps.value == "divide"
    d = config.to_dict()["profile"]
    assert d["name"] == "vllm-hopper" and d["version"] == 1 and "compressed_tensors_w4a4_nvfp4.py" in d["source"]
    assert config.label().startswith("vllm-hopper: ")


def test_profile_without_format_waits_for_a_checkpoint():
    config, _ = parse_mx_args({"profile": "vllm-hopper"})
    assert config.profile_pending
    from lm_eval_mx.hf.model import HFMXLM

    with pytest.raises(ValueError, match="profile=vllm-hopper needs the format"):
        HFMXLM.check_before_loading(pretrained=str(DATA), profile="vllm-hopper")


def test_compare_plans_each_profile_with_each_config():
    from lm_eval_mx.commands.compare_profiles import profile_specs

    specs, refused = profile_specs(["ocp", "torchao"], [("--config 'format=nvfp4'", {"format": "nvfp4"}),
                                                        ("--config 'format=mxfp4'", {"format": "mxfp4"})])
    assert [s[1]["profile"] for s in specs] == ["torchao", "ocp", "torchao"]
    assert len(refused) == 1 and "ocp" in refused[0] and "E8M0" in refused[0]
    with pytest.raises(ValueError, match="sets profile= itself"):
        profile_specs(["ocp"], [("--config 'profile=ocp'", {"profile": "ocp"})])


def test_agreement_matrix():
    a, b = torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 0, 4])
    t = agreement({"a": a, "b": b, "nan": torch.tensor([1, -1, 3, 4])})
    assert t["a"]["b"] == 0.75 and t["a"]["a"] == 1.0 and np.isnan(t["a"]["nan"])


# ------------------------------------------------------------------------- vllm-blackwell: a cited transcription
# vLLM csrc/quantization/fp4/nvfp4_utils.cuh at 2c9ff65, cvt_warp_fp16_to_fp4, written out per block in numpy
# float32 (one IEEE operation per line); rcp.approx.ftz.f32 modelled as the correctly rounded reciprocal, flushed.


def _rcp(x: np.float32) -> np.float32:
    x = np.float32(0.0) if abs(x) < np.finfo(np.float32).tiny else x
    with np.errstate(divide="ignore"):
        r = np.float32(1.0) / np.float32(x)
    return np.float32(0.0) if abs(r) < np.finfo(np.float32).tiny else r


_E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=np.float32)


def _e2m1_rn_satfinite(v: np.float32) -> np.float32:
    """cvt.rn.satfinite.e2m1x2.f32: nearest E2M1 value, ties to the even code, saturating at 6."""
    a = min(abs(float(v)), 6.0)
    d = np.abs(_E2M1 - a)
    best = np.flatnonzero(d == d.min())
    code = best[0] if len(best) == 1 or best[0] % 2 == 0 else best[1]
    return np.float32(np.copysign(_E2M1[code], v))


def _cvt_warp_fp16_to_fp4(block: np.ndarray, gs: np.float32) -> tuple[np.float32, np.float32, np.ndarray]:
    vec_max = np.float32(np.abs(block).max())
    sf = np.float32(gs * np.float32(vec_max * _rcp(np.float32(6.0))))
    sf = np.float32(torch.tensor(min(float(sf), 448.0)).to(torch.float8_e4m3fn).float().item())  # satfinite
    out = _rcp(np.float32(sf * _rcp(gs))) if sf != 0 else np.float32(0.0)
    q = np.array([_e2m1_rn_satfinite(np.float32(v * out)) for v in block], dtype=np.float32)
    return sf, out, q * np.float32(sf * _rcp(gs))


def test_vllm_blackwell_rcp_model():
    """Step 1: rcp(6) is float32 RN(1/6); subnormal inputs flush to zero (rcp = inf), tiny results to 0."""
    from lm_eval_mx.numerics.quantize import rcp_ftz

    r = rcp_ftz(torch.tensor([6.0, 1e-40, 3e38], dtype=torch.float32))
    assert r[0].view(torch.int32).item() == 0x3E2AAAAB and torch.isinf(r[1]) and r[2] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vllm_blackwell_nvfp4_is_the_kernel_transcription(dtype):
    """Steps 2-4 (scale factor, output scale, E2M1 elements), block by block, against the numpy transcription of
    cvt_warp_fp16_to_fp4 with compressed-tensors' generate_gparam as the global multiplier."""
    pytest.importorskip("compressed_tensors", minversion="0.20")
    from compressed_tensors.quantization.utils import generate_gparam

    from lm_eval_mx.numerics.quantize import block_scales

    g = torch.Generator().manual_seed(5)
    x = (torch.randn(8, 256, generator=g) * torch.exp(torch.randn(8, 256, generator=g) * 3)).to(dtype)
    xf = x.float()
    amax = xf.abs().amax().reshape(1)
    gs = np.float32(generate_gparam(-amax, amax).item())
    s = scheme("vllm-blackwell", "nvfp4")
    blocks = xf.reshape(8, 16, 16)
    out, _, _, stored = block_scales(blocks.abs().amax(-1, keepdim=True), s, amax.reshape(()))
    ours = quantize(x, s).float().reshape(8, 16, 16)
    for i in range(8):
        for j in range(16):
            sf, o, deq = _cvt_warp_fp16_to_fp4(blocks[i, j].numpy(), gs)
            assert stored[i, j, 0].item() == sf and out[i, j, 0].item() == o, (i, j)
            deq = torch.from_numpy(deq).to(dtype).float().numpy()  # the dequantized block in the input's dtype
            assert np.array_equal((ours[i, j].numpy() + 0).view(np.uint32), (deq + 0).view(np.uint32)), (i, j)


def test_vllm_blackwell_weights_are_quantized_offline():
    """The kernel step is the activations'; the weights of a vllm-blackwell layer take llm-compressor's steps."""
    s = scheme("vllm-blackwell", "nvfp4")
    assert s.e4m3_steps is E4M3Steps.KERNEL and s.for_weights().e4m3_steps is E4M3Steps.DIVIDE
    with pytest.raises(ValueError, match="packed"):
        parse_mx_args({"profile": "vllm-blackwell", "format": "nvfp4", "packed": True})


def test_compare_profiles_end_to_end(tiny_dir, tmp_path, monkeypatch, capsys):
    """compare --profile on a saved tiny model: each profile x format run (refusals listed), the agreement matrix
    on the corpus, and the profile with its version in the results."""
    from lm_eval_mx.commands.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "cmp"
    rc = main(["compare", "--model_args", f"pretrained={tiny_dir}", "--tasks", "mx_corpus_ppl", "--limit", "1",
               "--config", "format=nvfp4", "--profile", "ocp", "--profile", "ct",
               "--agreement_tokens", "64", "--output_dir", str(out)])
    assert rc == 0
    agree = json.loads((out / "agreement.json").read_text())
    labels = list(agree["top1_agreement"])
    assert labels == ["baseline", "compressed-tensors: nvfp4 e4m3=divide"]  # ocp refuses nvfp4
    assert all(agree["top1_agreement"][a][a] == 1.0 for a in labels) and agree["tokens"] > 0
    assert len(agree["refused"]) == 1 and "profile=ocp" in agree["refused"][0]
    assert agree["profiles"][labels[1]]["name"] == "compressed-tensors" and agree["profiles"][labels[1]]["version"] == 2
    results = json.loads((out / "results_01.json").read_text())
    assert '"version": 2' in json.dumps(results) and "compressed-tensors" in json.dumps(results)
    printed = capsys.readouterr().out
    assert "refused: --profile ocp with --config 'format=nvfp4'" in printed and "top-1 agreement" in printed

"""The hf-mx lm-eval model: exactness vs hf, argument validation, numerical health, caching."""

from __future__ import annotations

import math

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from lm_eval_mx.hf.model import HFMXLM, mx_cache_tag
from lm_eval_mx.selection.apply import apply_mx
from lm_eval_mx.selection.config import MXConfig

PAIRS = [
    ("We hold these truths to be", " self-evident"),
    ("Four score and seven years ago our", " fathers"),
    ("The Senate of the United States shall be", " composed of two Senators"),
    ("", "Congress shall make no law"),
]


def requests(task: str = "t") -> list[Instance]:
    return [Instance("loglikelihood", {}, pair, i, metadata=(task, i, 1)) for i, pair in enumerate(PAIRS)]


def rolling_requests() -> list[Instance]:
    return [Instance("loglikelihood_rolling", {}, (c + t,), i, metadata=("t", i, 1)) for i, (c, t) in enumerate(PAIRS)]


def generate_requests() -> list[Instance]:
    kwargs = {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}
    return [Instance("generate_until", {}, (c or t, dict(kwargs)), i, metadata=("t", i, 1))
            for i, (c, t) in enumerate(PAIRS)]


def test_mx_off_is_bit_identical_to_hf(tiny_dir):
    """roles=none is lm-eval's hf, bit for bit, through every request type lm-eval sends a causal model."""
    hf = HFLM(pretrained=tiny_dir, device="cpu", batch_size=2)
    mx = HFMXLM(pretrained=tiny_dir, device="cpu", batch_size=2, roles="none")
    assert mx.mx_report.replaced == []
    assert hf.loglikelihood(requests()) == mx.loglikelihood(requests())
    rolling = hf.loglikelihood_rolling(rolling_requests())
    assert all(math.isfinite(v) for v in rolling)
    assert mx.loglikelihood_rolling(rolling_requests()) == rolling
    generated = hf.generate_until(generate_requests())
    assert any(generated) and mx.generate_until(generate_requests()) == generated


def test_mx_on_changes_rolling_and_generation(tiny_dir):
    """The two checks above can fail: with MX on, the same requests give other numbers."""
    hf = HFLM(pretrained=tiny_dir, device="cpu", batch_size=2)
    mx = HFMXLM(pretrained=tiny_dir, device="cpu", batch_size=2, format="fp4_e2m1")
    assert mx.loglikelihood_rolling(rolling_requests()) != hf.loglikelihood_rolling(rolling_requests())


def test_mx_on_equals_direct_replacement(tiny_dir):
    mx = HFMXLM(pretrained=tiny_dir, device="cpu", batch_size=2, format="fp4_e2m1", mlp_only=True)
    hf = HFLM(pretrained=tiny_dir, device="cpu", batch_size=2)
    base = hf.loglikelihood(requests())
    apply_mx(hf.model, MXConfig(w_format="fp4_e2m1", a_format="fp4_e2m1", roles=("mlp_up", "mlp_down", "experts")))
    direct = hf.loglikelihood(requests())
    got = mx.loglikelihood(requests())
    assert got == direct
    assert got != base
    info = mx.get_model_info()
    assert info["mx_config"]["w_format"] == "fp4_e2m1"
    assert info["mx_report"]["layers_per_role"] == {"mlp_down": 2, "mlp_up": 4}


def test_set_mx_swaps_configs_on_one_copy(tiny_dir):
    lm = HFMXLM(pretrained=tiny_dir, device="cpu", roles="none", mx_keep_original=True)
    base = lm.loglikelihood(requests())
    lm.set_mx(MXConfig(w_format="fp4", a_format="fp4"))
    fp4 = lm.loglikelihood(requests())
    with lm.mx_off():  # MX switched off in place: the baseline, bit for bit
        assert lm.loglikelihood(requests()) == base
    assert lm.loglikelihood(requests()) == fp4  # and back on after the block
    lm.set_mx(MXConfig(roles=()))
    assert lm.loglikelihood(requests()) == base
    assert fp4 != base


def test_unknown_keys_fail_before_loading(tiny_dir, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("model load attempted")

    monkeypatch.setattr(HFLM, "__init__", boom)
    with pytest.raises(ValueError, match=r"'mlp_onyl' \(did you mean mlp_only\?\)"):
        HFMXLM(pretrained=tiny_dir, mlp_onyl=True)
    with pytest.raises(ValueError, match="valid formats"):
        HFMXLM(pretrained=tiny_dir, w_format="fp5")
    with pytest.raises(ValueError, match="block_size"):
        HFMXLM(pretrained=tiny_dir, block_size="abc")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="mx_backend=triton needs CUDA"):
            HFMXLM(pretrained=tiny_dir, mx_backend="triton")


def test_config_attribute_overrides_are_allowed(tiny_dir):
    lm = HFMXLM(pretrained=tiny_dir, device="cpu", roles="none", rms_norm_eps=1e-5)
    assert lm.model.config.rms_norm_eps == 1e-5


def test_nonfinite_logits_are_reported(tiny_dir, caplog):
    lm = HFMXLM(pretrained=tiny_dir, device="cpu", mlp_only=True)
    lm.model.model.layers[0].mlp.down_proj.weight.data[0, 0] = float("nan")
    with caplog.at_level("WARNING", logger="lm_eval_mx"):
        out = lm.loglikelihood(requests("my_task"))
    assert all(math.isnan(v) for v, _ in out)
    assert lm.get_model_info()["mx_nonfinite_requests"] == {"my_task": len(PAIRS)}
    assert "non-finite" in caplog.text and "my_task: 4" in caplog.text


def test_cache_tag_differs_per_config(tiny_dir, tmp_path):
    lm = HFMXLM(pretrained=tiny_dir, device="cpu", mlp_only=True)
    other = MXConfig(w_format="fp4", a_format="fp4")
    assert lm.mx_cache_tag and lm.mx_cache_tag.startswith("mx-")
    assert mx_cache_tag(other, lm.mx_report) != lm.mx_cache_tag
    from lm_eval.api.model import CachingLM

    cached = CachingLM(lm, str(tmp_path / "cache") + "_rank0.db")  # the path lm-eval's --use_cache makes
    assert cached.dbdict.filename == str(tmp_path / f"cache_rank0_{lm.mx_cache_tag}.db")  # docs/model_args.md, *Caching*


def test_bf16_model(tiny_dir):
    """A bf16 model in MX gives what hf's bf16 model with its layers replaced directly gives, and not hf's own."""
    lm = HFMXLM(pretrained=tiny_dir, device="cpu", dtype="bfloat16", format="fp8_e4m3")
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}
    out = lm.loglikelihood(requests())
    hf = HFLM(pretrained=tiny_dir, device="cpu", dtype="bfloat16")
    base = hf.loglikelihood(requests())
    apply_mx(hf.model, MXConfig(w_format="fp8_e4m3", a_format="fp8_e4m3"))
    assert out == hf.loglikelihood(requests())
    assert out != base
    assert all(math.isfinite(v) for v, _ in out)


def test_hf_backend_key_is_hf_s_own(tiny_dir):
    """`backend` is lm-eval hf's (causal/seq2seq); the MX engine is `mx_backend`."""
    lm = HFMXLM(pretrained=tiny_dir, device="cpu", backend="causal", mx_backend="torch", format="nvfp4", mlp_only=True)
    assert lm.backend == "causal"
    info = lm.get_model_info()
    assert info["mx_config"]["mx_backend"] == "torch"
    assert info["mx_schemes"] == {"nvfp4": {"name": "nvfp4", "elem": "fp4_e2m1", "block_size": 16, "scale_format": "e4m3",
                                            "tensor_scale": "amax", "rounding": "even", "bits_per_element": 4.5}}
    assert info["mx_report"]["layers_per_format"] == {"w=nvfp4,a=nvfp4": 6}


def test_hf_args_that_clash_with_mx_fail_before_loading(tiny_dir, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("model load attempted")

    monkeypatch.setattr(HFLM, "__init__", boom)
    with pytest.raises(ValueError, match="attn_bmm=True runs attention through hf-mx's 'mx_eager' function, which "
                                         "would override attn_implementation=sdpa"):
        HFMXLM(pretrained=tiny_dir, attn_bmm=True, attn_implementation="sdpa")
    with pytest.raises(ValueError, match="packed_gemm=fused is a Triton GEMM for CUDA"):
        HFMXLM(pretrained=tiny_dir, packed=True, packed_gemm="fused", device="cpu")
    with pytest.raises(ValueError, match="role_formats names 'mlp', which is not among the selected roles"):
        HFMXLM(pretrained=tiny_dir, attn_only=True, role_formats="mlp:fp4")


def test_unreadable_config_is_reported_with_its_cause(tmp_path, monkeypatch):
    """An unknown key used to be reported as unknown when the config could not be read; now the cause shows,
    and trust_remote_code='False' (a string) stays false."""
    def boom(*a, **k):
        raise AssertionError("model load attempted")

    monkeypatch.setattr(HFLM, "__init__", boom)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"'rope_scale' are neither MX nor hf arguments.*could not be read to check"):
        HFMXLM(pretrained=str(tmp_path), rope_scale=2)
    import transformers

    seen = {}

    def fake(*a, **k):
        seen.update(k)
        raise OSError("offline")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", fake)
    with pytest.raises(ValueError, match="OSError: offline"):
        HFMXLM(pretrained=str(tmp_path), rope_scale=2, trust_remote_code="False")
    assert seen["trust_remote_code"] is False


def test_hf_backend_key_given_an_mx_engine_fails_before_loading(tiny_dir, monkeypatch):
    """backend=torch used to die in a bare AssertionError inside lm-eval's HFLM."""
    def boom(*a, **k):
        raise AssertionError("model load attempted")

    monkeypatch.setattr(HFLM, "__init__", boom)
    with pytest.raises(ValueError, match=r"backend=torch: backend is lm-eval hf's own key \(default, causal, seq2seq\); "
                                         r"the MX quantization engine is mx_backend \(auto, torch, triton\)"):
        HFMXLM(pretrained=tiny_dir, backend="torch")


def test_replacement_report_is_shown_at_default_settings(tiny_dir, capsys):
    """The report reaches the user with no logging configured: as lm-eval's CLI and simple_evaluate build the
    model (registry + create_from_arg_string), and once per load."""
    from lm_eval.api.registry import get_model

    lm = get_model("hf-mx").create_from_arg_string(f"pretrained={tiny_dir},mlp_only=True,format=fp4,mx_keep_original=True",
                                                   {"device": "cpu", "batch_size": 1})
    err = capsys.readouterr().err
    assert "hf-mx: MX configuration: fp4_e2m1 mlp" in err and "MX replacement report" in err
    assert err.count("MX replacement report") == 1 and "mlp_up" in err and "6 layers" in err
    lm.set_mx(MXConfig(roles=()))
    assert "MX off (roles=none)" in capsys.readouterr().err

"""Packed MX checkpoints: ``save_pretrained`` of packed layers writes codes and scales; loading the directory (with
transformers or ``hf-mx pretrained=DIR``) runs them as stored, bit for bit, and refuses what would change them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import save_tiny
from safetensors.torch import load_file, save_file
from test_cli_e2e import env, needs_install
from transformers import AutoModelForCausalLM

from lm_eval_mx.hf.model import HFMXLM
from lm_eval_mx.hf.quantizer import MXQuantizationConfig
from lm_eval_mx.nn.layers import MXPackedLayer, mx_layers

CASES = [
    ("llama", dict(format="nvfp4", rotation="hadamard", rotation_seed=3)),  # E4M3 + tensor scale, stored rotated
    ("mixtral", dict(w_format="fp4_e2m1", a_format="fp8_e4m3")),  # fused 3-D experts
    ("gpt2", dict(format="int4", block_size=16, roles="mlp")),  # Conv1D, stored transposed
]


def _save_packed(src: str, out: str, cfg: dict) -> torch.nn.Module:
    """A packed=True load of ``src`` saved to ``out`` with its tokenizer (what lm-eval-mx quantize --method rtn writes)."""
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=MXQuantizationConfig(**cfg),
                                                 dtype=torch.float32).eval()
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{src}/{f}", f"{out}/{f}")
    return model


@pytest.mark.parametrize(("arch", "cfg"), CASES, ids=[a for a, _ in CASES])
def test_saved_packed_weights_load_as_stored(tmp_path, arch, cfg):
    src = save_tiny(tmp_path / "src", arch)
    model = _save_packed(src, str(tmp_path / "packed"), cfg)
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
    stored = json.loads((tmp_path / "packed" / "config.json").read_text())["quantization_config"]
    assert stored["quant_method"] == "mx"
    tensors = load_file(tmp_path / "packed" / "model.safetensors")  # (fused experts are saved per expert)
    assert sum(t.numel() for t in tensors.values() if t.dtype == torch.uint8) * 2 >= sum(
        m.mx_shapes[w].numel() for _, m in mx_layers(model) for w in m.mx_prequantized)  # 4-bit codes: 2 a byte

    again = AutoModelForCausalLM.from_pretrained(tmp_path / "packed", dtype=torch.float32).eval()
    assert again.hf_quantizer.pre_quantized
    layers = dict(mx_layers(again))
    assert layers and all(isinstance(m, MXPackedLayer) for m in layers.values())
    for n, m in mx_layers(model):
        for k in m.mx_stored():
            assert torch.equal(getattr(layers[n], k), getattr(m, k)), f"{n}.{k}"
    with torch.no_grad():
        assert torch.equal(again(ids).logits, want)

    lm = HFMXLM(pretrained=str(tmp_path / "packed"), device="cpu", dtype="float32")
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, want)
    assert lm.mx_config.packed and lm.mx_report.replaced
    assert lm.get_model_info()["mx_checkpoint"]["format"] == "packed MX (quant_method=mx)"


@pytest.fixture(scope="module")
def packed_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("packed")
    src = save_tiny(root / "src", "llama")
    _save_packed(src, str(root / "packed"), dict(format="nvfp4"))
    return str(root / "packed")


def test_run_time_keys_beside_a_packed_checkpoint(packed_dir):
    lm = HFMXLM(pretrained=packed_dir, device="cpu", dtype="float32", mx_backend="TORCH", packed_gemm="dequant")
    assert {m.mx_spec.backend for _, m in mx_layers(lm.model)} == {"torch"}
    assert {m.mx_gemm for _, m in mx_layers(lm.model)} == {"dequant"}
    assert lm.mx_config.mx_backend == "torch" and lm.mx_config.given >= {"mx_backend", "packed_gemm"}
    with pytest.raises(ValueError, match="packed_gemm=fused is a Triton GEMM for CUDA"):
        HFMXLM.check_before_loading(pretrained=packed_dir, device="cpu", packed_gemm="fused")


@pytest.mark.parametrize("extra", [dict(format="fp8"), dict(roles="mlp"), dict(packed=True),
                                   dict(rotation="hadamard"), dict(a_format="fp8_e4m3")])
def test_keys_that_would_change_stored_weights_are_refused_before_loading(packed_dir, extra, monkeypatch):
    monkeypatch.setattr("lm_eval_mx.hf.model.HFLM.__init__", lambda *a, **k: pytest.fail("loaded"))
    key = next(iter(extra))
    with pytest.raises(ValueError, match=rf"stores packed MX weights \(nvfp4 packed\).*{key} would change them"):
        HFMXLM(pretrained=packed_dir, device="cpu", **extra)


@pytest.mark.parametrize("extra", [dict(mx_keep_original=True), dict(peft="adapter"), dict(load_in_8bit=True)])
def test_options_a_packed_checkpoint_cannot_honour(packed_dir, extra, monkeypatch):
    monkeypatch.setattr("lm_eval_mx.hf.model.HFLM.__init__", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(ValueError, match=r"holds only quantized codes|cannot be combined with"):
        HFMXLM(pretrained=packed_dir, device="cpu", **extra)


def test_missing_stored_tensor_is_named(tmp_path, packed_dir):
    bad = tmp_path / "bad"
    shutil.copytree(packed_dir, bad)
    sd = load_file(bad / "model.safetensors")
    del sd["model.layers.0.mlp.down_proj.weight"], sd["model.layers.1.self_attn.q_proj.weight_scales"]
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"2 tensors .* missing .*model\.layers\.0\.mlp\.down_proj\.weight, "
                                         r"model\.layers\.1\.self_attn\.q_proj\.weight_scales.*nothing was evaluated"):
        HFMXLM(pretrained=str(bad), device="cpu", dtype="float32")


def test_stored_tensor_of_the_wrong_shape_is_refused(tmp_path, packed_dir):
    bad = tmp_path / "bad"
    shutil.copytree(packed_dir, bad)
    sd = load_file(bad / "model.safetensors")
    sd["model.layers.0.mlp.up_proj.weight_scales"] = sd["model.layers.0.mlp.up_proj.weight_scales"][:, :-1].clone()
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj\.weight_scales is stored as U8"):
        AutoModelForCausalLM.from_pretrained(bad, dtype=torch.float32)


def test_compare_evaluates_stored_checkpoints_beside_configurations(tmp_path, monkeypatch):
    """One table: the baseline, an MX configuration on it, and packed checkpoints as stored. A checkpoint of the
    same configuration as --config (RTN, what packed=True stores) gives the same numbers bit for bit."""
    from lm_eval_mx.commands.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    src = save_tiny(tmp_path / "src", "llama")
    _save_packed(src, str(tmp_path / "rtn"), dict(format="fp4_e2m1", roles="mlp"))
    out = tmp_path / "cmp"
    rc = main(["compare", "--model_args", f"pretrained={src},dtype=float32", "--tasks", "mx_corpus_ppl", "--limit", "2",
               "--config", "format=fp4_e2m1,roles=mlp", "--checkpoint", f"stored={tmp_path / 'rtn'}",
               "--output_dir", str(out)])
    assert rc == 0
    data = json.loads((out / "compare.json").read_text())
    assert list(data["configs"]) == ["fp4_e2m1 mlp", "stored"]
    assert data["configs"]["stored"]["packed"] is True
    row = next(r for r in data["rows"] if r["metric"] == "bits_per_byte")
    assert row["mx"]["stored"]["value"] == row["mx"]["fp4_e2m1 mlp"]["value"] != row["baseline"]


@pytest.mark.parametrize(("value", "match"), [
    ("{tmp}/nothing", "is not a model directory"),
    ("x={src}", "is not quantized"),
    ("={src}", "give DIR or LABEL=DIR"),
])
def test_compare_checkpoint_refusals(tmp_path, value, match):
    from lm_eval_mx.commands.cli import main

    src = save_tiny(tmp_path / "src", "llama")
    arg = value.format(tmp=tmp_path, src=src)
    with pytest.raises(SystemExit, match=match):
        main(["compare", "--model_args", f"pretrained={src}", "--tasks", "mx_corpus_ppl", "--checkpoint", arg])


def test_compare_checks_checkpoints_before_the_baseline_runs(tmp_path, packed_dir, monkeypatch):
    """hf arguments a checkpoint cannot take fail before anything loads, not after the baseline's evaluation."""
    from lm_eval_mx.commands.cli import main

    monkeypatch.setattr("lm_eval_mx.hf.model.HFLM.__init__", lambda *a, **k: pytest.fail("loaded"))
    src = save_tiny(tmp_path / "src", "llama")
    with pytest.raises(SystemExit, match=rf"--checkpoint ck={packed_dir}: .*cannot be combined with peft"):
        main(["compare", "--model_args", f"pretrained={src},peft=adapter", "--tasks", "mx_corpus_ppl",
              "--device", "cpu", "--checkpoint", f"ck={packed_dir}"])


@needs_install
def test_plain_from_pretrained_loads_a_packed_checkpoint(packed_dir):
    """transformers' own ``from_pretrained(DIR)`` in a fresh interpreter that never imports lm_eval_mx: the installed
    hook registers the ``mx`` quantizer when transformers meets ``quant_method: mx``, so the checkpoint loads as stored
    (packed layers, the same logits as hf-mx) instead of transformers skipping the quantization and failing on every
    packed tensor's size; a config of another method imports nothing of lm_eval_mx."""
    ids = [[1, 5, 9, 2, 7]]
    code = (f"import sys, torch; from transformers import AutoModelForCausalLM, AutoConfig\n"
            f"m = AutoModelForCausalLM.from_pretrained({packed_dir!r}, dtype=torch.float32)\n"
            f"print(type(m.model.layers[0].mlp.up_proj).__name__)\n"
            f"torch.save(m(torch.tensor({ids})).logits, {packed_dir + '/plain_logits.pt'!r})")
    out = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1].startswith("MXPacked")
    lm = HFMXLM(pretrained=packed_dir, device="cpu", dtype="float32")
    with torch.no_grad():
        assert torch.equal(torch.load(packed_dir + "/plain_logits.pt"), lm.model(torch.tensor(ids)).logits)
    code = ("import sys, transformers.quantizers.auto as a\n"
            "print(a.AutoHfQuantizer.supports_quant_method({'quant_method': 'fp8'}), 'lm_eval_mx.hf' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, timeout=300)
    assert out.stdout.split()[-2:] == ["True", "False"], out.stderr[-2000:]

"""``lm-eval-mx quantize``: RTN output equals packed=True bit for bit, GPTQ output holds the driver's codes, runs are
reproducible, and every input the command refuses is refused before the model loads."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import pytest
import torch
from conftest import save_tiny
from transformers import AutoModelForCausalLM, AutoTokenizer

from lm_eval_mx.commands import cli
from lm_eval_mx.hf.quantizer import MXQuantizationConfig
from lm_eval_mx.nn.layers import MXPackedLayer, mx_layers
from lm_eval_mx.numerics.packing import unpack_mx

CORPUS = str(Path(__file__).resolve().parents[1] / "tasks" / "corpus" / "us_constitution.txt")
GPTQ = ["--method", "gptq", "--calibration", CORPUS, "--nsamples", "8", "--seqlen", "32", "--block_columns", "32"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _quantize(model_args: str, out: Path, *extra: str) -> Path:
    assert cli.main(["quantize", "--model_args", model_args, "--output", str(out), "--device", "cpu", *extra]) == 0
    return out


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 128, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids).logits


def _packed(model: torch.nn.Module) -> dict[str, MXPackedLayer]:
    layers = {n: m for n, m in mx_layers(model) if isinstance(m, MXPackedLayer)}
    assert layers
    return layers


@pytest.mark.parametrize("arch,cfg", [("llama", "format=mxfp4"), ("llama", "w_format=nvfp4,a_format=fp8_e4m3,rotation=hadamard"),
                                      ("mixtral", "format=mxfp4,roles=mlp|experts")])
def test_rtn_equals_packed_load(tmp_path, tiny_dir, arch, cfg):
    src = tiny_dir if arch == "llama" else save_tiny(tmp_path / arch, arch)
    out = _quantize(f"pretrained={src},{cfg}", tmp_path / "rtn", "--method", "rtn")
    got = AutoModelForCausalLM.from_pretrained(out).eval()
    keys = dict(kv.split("=") for kv in cfg.split(","))
    ref = AutoModelForCausalLM.from_pretrained(src, quantization_config=MXQuantizationConfig(**keys)).eval()
    stored, packed = _packed(got), _packed(ref)
    assert stored.keys() == packed.keys()
    for name, m in stored.items():
        for w in m.mx_stored():
            assert torch.equal(getattr(m, w), getattr(packed[name], w)), (name, w)
    assert torch.equal(_logits(got), _logits(ref))
    assert got.config.quantization_config.origin["method"] == "rtn"


def _driver(src: str, cfg: str, nsamples: int = 8, seqlen: int = 32, **options):
    """What the library pipeline gives on the same windows: the GPTQ results by layer name."""
    from lm_eval_mx.algorithms.calibration import calibration_windows, read_texts
    from lm_eval_mx.algorithms.gptq import GPTQOptions
    from lm_eval_mx.algorithms.quantize_model import plan, run_gptq
    from lm_eval_mx.selection.config import parse_mx_args

    model = AutoModelForCausalLM.from_pretrained(src).eval()
    config = parse_mx_args(dict(kv.split("=") for kv in cfg.split(",")))[0]
    windows, _ = calibration_windows(AutoTokenizer.from_pretrained(src), read_texts([CORPUS])[0], nsamples, seqlen, 0)
    return run_gptq(model, plan(model, config, "gptq"), windows, GPTQOptions(block_columns=32, **options))


@pytest.mark.parametrize("cfg", ["format=mxfp4", "format=nvfp4,rotation=hadamard"])
def test_gptq_checkpoint_holds_the_driver_codes(tmp_path, tiny_dir, cfg):
    out = _quantize(f"pretrained={tiny_dir},{cfg}", tmp_path / "gptq", *GPTQ)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    results = _driver(tiny_dir, cfg)
    layers = _packed(model)
    assert layers.keys() == results.keys() and len(layers) == 14
    for name, m in layers.items():
        r = results[name]
        assert torch.equal(m.weight, r.packed.codes) and torch.equal(m.weight_scales, r.packed.scales)
        assert torch.equal(unpack_mx(m.mx_packed("weight")).view(torch.int32), r.weight.view(torch.int32)), name
        assert r.hessian_error < r.rtn_hessian_error, name
    assert torch.isfinite(_logits(model)).all()
    origin = model.config.quantization_config.origin
    assert origin["method"] == "gptq" and origin["gptq"]["block_columns"] == 32 and origin["gptq"]["damp"] == 0.01
    cal = origin["calibration"]
    assert cal["nsamples"] == 8 and cal["tokens"] == 8 * 32 and 0 < cal["texts_read"] <= cal["texts_available"]
    assert origin["diagnostics"]["hessian_error_ratio"] < 1 and origin["diagnostics"]["layers_above_rtn"] == 0
    report = json.loads((out / "mx_quantize.json").read_text())
    assert all(row["hessian_error"] < row["rtn_hessian_error"] for row in report["layers"])
    # GPTQ differs from RTN (the same config stored by RTN)
    rtn = AutoModelForCausalLM.from_pretrained(
        tiny_dir, quantization_config=MXQuantizationConfig(**dict(kv.split("=") for kv in cfg.split(","))))
    assert not torch.equal(_logits(model), _logits(rtn))


def test_gptq_is_reproducible_and_overwrite(tmp_path, tiny_dir):
    args = f"pretrained={tiny_dir},format=mxfp4,roles=mlp"
    a = _quantize(args, tmp_path / "a", *GPTQ, "--act_order")
    b = _quantize(args, tmp_path / "b", *GPTQ, "--act_order")
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) and "model.safetensors" in names
    assert all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)
    (tmp_path / "b" / "stale.txt").write_text("x")
    _quantize(args, tmp_path / "b", *GPTQ, "--act_order", "--seed", "1", "--overwrite")
    assert not (tmp_path / "b" / "stale.txt").exists()
    assert not filecmp.cmp(a / "model.safetensors", b / "model.safetensors", shallow=False)  # other windows


def test_task_calibration(tmp_path, tiny_dir):
    from lm_eval_mx.algorithms.calibration import task_texts

    texts = task_texts("piqa_offline")
    assert texts[0].startswith("Question: ") and "\nAnswer: " in texts[0]
    out = _quantize(f"pretrained={tiny_dir},format=mxfp8,roles=attn_out", tmp_path / "t", "--method", "gptq",
                    "--calibration", "piqa_offline", "--nsamples", "4", "--seqlen", "16")
    origin = AutoModelForCausalLM.from_pretrained(out).config.quantization_config.origin
    assert origin["calibration"]["source"] == ["piqa_offline"]


def _no_load(monkeypatch):
    from lm_eval_mx.hf.model import HFMXLM

    def fail(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(HFMXLM, "__init__", fail)


@pytest.mark.parametrize("extra,match", [
    (["--model_args", "pretrained=P,roles=none", "--method", "rtn"], "select no layer"),
    (["--model_args", "pretrained=P,format=mxfp4,packed=True", "--method", "rtn"], "packed would be ignored"),
    (["--model_args", "pretrained=P,format=mxfp4,packed_gemm=fused", "--method", "rtn"], "packed_gemm would be ignored"),
    (["--model_args", "pretrained=P,format=mxfp4,mx_keep_original=True", "--method", "rtn"], "mx_keep_original"),
    (["--model_args", "pretrained=P,format=mxfp4,mx_backend=torch", "--method", "rtn"], "mx_backend would be ignored"),
    (["--model_args", "pretrained=P,format=mxfp4", "--method", "rtn", "--nsamples", "128"], "--nsamples would be"),
    (["--model_args", "pretrained=P,format=mxfp4", "--method", "rtn", "--seed", "0"], "--seed would be ignored"),
    (["--model_args", "pretrained=P,format=mxfp4", "--method", "rtn", "--damp", "0.1"], "--damp would be ignored"),
    (["--model_args", "pretrained=P,format=mxfp4", "--method", "rtn", "--act_order"], "--act_order would be ignored"),
    (["--model_args", "pretrained=P,format=mxfp4", "--method", "rtn", "--calibration", CORPUS], "--calibration would"),
    (["--model_args", "pretrained=P,format=mxfp4", *GPTQ, "--act_order", "--scales", "lazy"], "needs --scales static"),
    (["--model_args", "pretrained=P,format=mxfp4", *GPTQ, "--damp", "-1"], "--damp must be"),
    (["--model_args", "pretrained=P,format=mxfp4", *GPTQ, "--damp", "nan"], "--damp must be"),
    (["--model_args", "pretrained=P,format=mxfp4", *GPTQ, "--block_columns", "0"], "--block_columns must be"),
    (["--model_args", "pretrained=P,format=mxfp4", *GPTQ, "--nsamples", "0"], "--nsamples must be"),
    (["--model_args", "pretrained=P,format=mxfp4", "--method", "gptq"], "needs --calibration"),
    (["--model_args", "pretrained=P,format=mxfp4", "--method", "gptq", "--calibration", "EMPTY"], "holds no text"),
    (["--model_args", "pretrained=P,format=mxfp4", "--method", "gptq", "--calibration", CORPUS, "no_such.txt"],
     "no_such.txt is not a file"),
    (["--model_args", "pretrained=P,format=mxfp9", "--method", "rtn"], "mxfp9"),
    (["--model_args", "format=mxfp4", "--method", "rtn"], "needs pretrained"),
])
def test_refusals_before_loading(tmp_path, monkeypatch, capsys, extra, match):
    _no_load(monkeypatch)
    (tmp_path / "empty.txt").write_text("\n\n")
    extra = [str(tmp_path / "empty.txt") if x == "EMPTY" else x for x in extra]
    with pytest.raises(SystemExit) as e:
        cli.main(["quantize", *extra, "--output", str(tmp_path / "out"), "--device", "cpu"])
    assert str(e.value).startswith("lm-eval-mx quantize: ") and "\n" not in str(e.value)
    assert match in str(e.value), str(e.value)


def test_output_refusals(tmp_path, monkeypatch):
    _no_load(monkeypatch)
    (tmp_path / "file").write_text("x")
    (tmp_path / "exists").mkdir()
    (tmp_path / "notmodel").mkdir()
    (tmp_path / "notmodel" / "data.txt").write_text("x")
    cases = [("exists", [], "pass --overwrite"), ("file", [], "is a file"), ("missing/out", [], "does not exist"),
             ("notmodel", ["--overwrite"], "not a packed MX checkpoint")]
    for out, flags, match in cases:
        with pytest.raises(SystemExit, match=match):
            cli.main(["quantize", "--model_args", "pretrained=P,format=mxfp4", "--method", "rtn", "--output",
                      str(tmp_path / out), *flags])


def test_refusals_after_loading(tmp_path, tiny_dir, monkeypatch):
    base = f"pretrained={tiny_dir},format=mxfp4"
    cases = [
        ([*GPTQ[:4], "--nsamples", "500", "--seqlen", "64"], "fewer than --nsamples 500"),
    ]
    for i, (flags, match) in enumerate(cases):
        with pytest.raises(SystemExit, match=match):
            _quantize(base, tmp_path / f"o{i}", *flags)
        assert not (tmp_path / f"o{i}").exists()
    from lm_eval_mx.algorithms import gptq

    def singular(*a, **k):
        raise gptq.GPTQError("GPTQ: the damped Hessian of the layer of shape (64, 64) is not positive definite")

    monkeypatch.setattr(gptq, "inverse_hessian_factor", singular)
    with pytest.raises(SystemExit, match="lm-eval-mx quantize: GPTQ: the damped Hessian"):
        _quantize(base, tmp_path / "chol", *GPTQ)


def test_gptq_fused_experts_checkpoint(tmp_path):
    """GPTQ on a tiny Mixtral (fused experts and lm_head): the checkpoint loads and holds each expert's codes as the
    driver chose them; the report lists every expert with its routed tokens (test_gptq_moe checks the Hessians)."""
    src = save_tiny(tmp_path / "mixtral", "mixtral")
    cfg = "format=mxfp4,roles=all|lm_head"
    out = _quantize(f"pretrained={src},{cfg}", tmp_path / "o", *GPTQ, "--expert_min_tokens", "8")
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    results = _driver(src, cfg, expert_min_tokens=8)
    experts = model.model.layers[1].mlp.experts
    for name in ("gate_up_proj", "down_proj"):
        for e in range(4):
            r = results[f"model.layers.1.mlp.experts.{name}.{e}"]
            assert torch.equal(experts.mx_packed(name, e).codes, r.packed.codes), (name, e)
    assert torch.equal(model.lm_head.weight, results["lm_head"].packed.codes)
    rows = {r["name"]: r for r in json.loads((out / "mx_quantize.json").read_text())["layers"]}
    row = rows["model.layers.0.mlp.experts"]
    assert len(row["experts"]) == 8 and sum(x["tokens"] for x in row["experts"] if x["weight"] == "down_proj") == 8 * 32 * 2
    assert torch.isfinite(_logits(model)).all()


def test_quantized_input_and_output_over_the_input_are_refused(tmp_path, tiny_dir, monkeypatch):
    """A checkpoint already quantized (here: a quantize output) is refused before loading, and --output may not be
    the model being quantized (with --overwrite it would be replaced)."""
    out = tmp_path / "rtn"
    assert cli.main(["quantize", "--model_args", f"pretrained={tiny_dir},format=mxfp4", "--method", "rtn",
                     "--output", str(out), "--device", "cpu"]) == 0
    _no_load(monkeypatch)
    with pytest.raises(SystemExit, match=r"is already quantized \(packed MX weights\)"):
        cli.main(["quantize", "--model_args", f"pretrained={out},format=mxfp4", "--method", "rtn", "--output",
                  str(tmp_path / "again"), "--device", "cpu"])
    with pytest.raises(SystemExit, match="is the model being quantized"):
        cli.main(["quantize", "--model_args", f"pretrained={out},format=mxfp4", "--method", "rtn", "--output",
                  str(out), "--overwrite", "--device", "cpu"])


def test_calibration_reads_only_the_texts_the_windows_need(tiny_dir):
    """Texts in a seeded random order, read only until nsamples * seqlen tokens are there: the windows are those
    tokens, in that order (a task of 10,000 documents costs what the windows need)."""
    from transformers import AutoTokenizer

    from lm_eval_mx.algorithms.calibration import calibration_windows

    tok = AutoTokenizer.from_pretrained(tiny_dir)
    texts = [f"document number {i} says hello to the world" for i in range(10_000)]
    seen: list[int] = []

    class Lazy(list):
        def __getitem__(self, i):
            seen.append(i)
            return list.__getitem__(self, i)

    windows, read = calibration_windows(tok, Lazy(texts), 4, 16, seed=3)
    assert read == len(seen) < 40 and windows.shape == (4, 16)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(3)).tolist()
    assert seen == order[:read]
    ids = [t for i in seen for t in tok(texts[i], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    assert windows.flatten().tolist() == ids[:64]
    again, _ = calibration_windows(tok, texts, 4, 16, seed=3)
    assert torch.equal(again, windows)
    with pytest.raises(ValueError, match=r"holds \d+ tokens, \d+ windows of --seqlen 16, fewer than --nsamples 4"):
        calibration_windows(tok, texts[:2], 4, 16)

"""Nothing a user gave is lost, nothing bad is silent (issue 30): ``quantize --output`` never deletes an input or a
directory it did not write, writes beside the output with the user's umask, and every output, checkpoint and
argument that could fail after long work is refused first, in one line naming the setting."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import save_tiny
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from lm_eval_mx.commands import cli
from lm_eval_mx.hf.model import HFMXLM
from lm_eval_mx.hf.quantizer import MXQuantizationConfig

pytestmark = pytest.mark.usefixtures("one_thread")
CORPUS = str(Path(__file__).resolve().parents[1] / "tasks" / "corpus" / "us_constitution.txt")
NO_PROC = pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="/proc: a directory nobody can write in")


def _no_load(monkeypatch) -> None:
    def fail(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(HFMXLM, "__init__", fail)


def _quantize(*argv: str) -> int:
    return cli.main(["quantize", "--method", "rtn", *argv])


def _refused(match: str, *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(list(argv))
    msg = str(e.value)
    assert "\n" not in msg and re.search(match, msg), msg
    return msg


@pytest.fixture(scope="module")
def packed(tmp_path_factory, tiny_dir) -> str:
    """A packed MX checkpoint (RTN, MXFP4 on the MLP) of the tiny Llama, as quantize writes it."""
    out = tmp_path_factory.mktemp("ck") / "rtn"
    assert _quantize("--model_args", f"pretrained={tiny_dir},format=mxfp4,roles=mlp", "--output", str(out),
                     "--device", "cpu") == 0
    return str(out)


# --- quantize: nothing deleted but the named output -------------------------------------------------------------

def test_overwrite_never_deletes_the_input_inside_the_output(tmp_path, tiny_dir, monkeypatch):
    """D holds a config.json and the source model in D/src: --output D --overwrite is refused, nothing deleted."""
    d = tmp_path / "D"
    shutil.copytree(tiny_dir, d / "src")
    shutil.copy(d / "src" / "config.json", d / "config.json")
    before = sorted(p.relative_to(d) for p in d.rglob("*"))
    _no_load(monkeypatch)
    _refused("holds .*an input of this command", "quantize", "--method", "rtn", "--model_args",
             f"pretrained={d / 'src'},format=mxfp4", "--output", str(d), "--overwrite", "--device", "cpu")
    _refused("not a packed MX checkpoint", "quantize", "--method", "rtn", "--model_args",
             f"pretrained={tiny_dir},format=mxfp4", "--output", str(d), "--overwrite", "--device", "cpu")
    assert sorted(p.relative_to(d) for p in d.rglob("*")) == before


def test_output_dot_is_replaced_from_beside_it_with_the_umask(tmp_path, tiny_dir, packed, monkeypatch):
    """--output . in an lm-eval-mx checkpoint: the new one is written beside it (not inside, as mkdtemp in the parent
    of '.' did), then takes its place; the directory gets the user's umask, not mkdtemp's 0700."""
    here = tmp_path / "here"
    shutil.copytree(packed, here)
    (here / "stale.txt").write_text("x")
    monkeypatch.chdir(here)
    old = os.umask(0o027)
    try:
        assert _quantize("--model_args", f"pretrained={tiny_dir},format=mxfp4", "--output", ".", "--overwrite",
                         "--device", "cpu") == 0
    finally:
        os.umask(old)
    assert not (here / "stale.txt").exists() and (here / "model.safetensors").is_file()
    assert "attn_qkv" in json.loads((here / "config.json").read_text())["quantization_config"]["mx"]["roles"]
    assert (here.stat().st_mode & 0o777) == 0o750
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]  # no temporary directory left beside it


@NO_PROC
@pytest.mark.parametrize(("output", "match"), [("/proc/x", "cannot write in /proc"), ("", "--output is empty"),
                                               ("/", "root directory")])
def test_output_that_cannot_be_written_is_refused_before_loading(output, match, monkeypatch):
    _no_load(monkeypatch)
    _refused(match, "quantize", "--method", "rtn", "--model_args", "pretrained=P,format=mxfp4", "--output", output,
             "--device", "cpu")


# --- quantize: refused before loading, one line naming the setting ---------------------------------------------

@pytest.mark.parametrize(("extra", "argv", "match"), [
    ("", ["--device", "bogus"], r"device 'bogus' is not a device: give cpu, cuda"),
    (",max_length=128", [], r"max_length in --model_args: .*quantize evaluates nothing"),
    (",load_in_4bit=True", [], r"load_in_4bit in --model_args: .*must load unquantized"),
    (",peft=adapter", [], r"peft in --model_args: .*merge the adapter"),
    (",backend=seq2seq", [], r"backend=seq2seq: quantize handles causal"),
    (",gguf_file=missing.gguf", [], r"pretrained=.*its config cannot be read"),
    ("", ["--method", "gptq", "--calibration", CORPUS, "--seqlen", "2049"], r"--seqlen 2049 exceeds the model's 2048 "),
    ("", ["--method", "gptq", "--calibration", CORPUS, "--seed", str(2**64)], r"--seed must be an integer in"),
    ("", ["--method", "gptq", "--calibration", ""], r"--calibration: an empty name"),
])
def test_quantize_inputs_refused_before_loading(tmp_path, tiny_dir, monkeypatch, extra, argv, match):
    _no_load(monkeypatch)
    method = [] if "--method" in argv else ["--method", "rtn"]
    device = [] if "--device" in argv else ["--device", "cpu"]
    _refused(match, "quantize", *method, "--model_args", f"pretrained={tiny_dir},format=mxfp4{extra}",
             "--output", str(tmp_path / "o"), *device, *argv)


def test_missing_pretrained_is_one_line(tmp_path, monkeypatch):
    _no_load(monkeypatch)
    _refused(r"pretrained=.*nowhere: its config cannot be read", "quantize", "--method", "rtn", "--model_args",
             f"pretrained={tmp_path / 'nowhere'},format=mxfp4", "--output", str(tmp_path / "o"), "--device", "cpu")


def test_calibration_task_whose_data_cannot_load(tmp_path, tiny_dir, monkeypatch):
    import lm_eval.tasks

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'Rowan/hellaswag' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(lm_eval.tasks, "get_task_dict", offline)
    _no_load(monkeypatch)
    _refused(r"--calibration: the documents of task 'hellaswag_offline' could not be loaded \(ConnectionError",
             "quantize", "--method", "gptq", "--calibration", "hellaswag_offline", "--model_args",
             f"pretrained={tiny_dir},format=mxfp4", "--output", str(tmp_path / "o"), "--device", "cpu")


# --- compare: outputs, labels and checkpoints checked before the baseline runs ----------------------------------

def _compare(tiny_dir: str, *argv: str) -> list[str]:
    return ["compare", "--model_args", f"pretrained={tiny_dir}", "--tasks", "mx_corpus_ppl", "--device", "cpu", *argv]


@NO_PROC
def test_compare_output_dir_checked_first(tmp_path, tiny_dir, monkeypatch):
    _no_load(monkeypatch)
    (tmp_path / "file").write_text("x")
    _refused(r"--output_dir .*/file/sub: .*/file is a file", *_compare(tiny_dir, "--config", "format=mxfp4",
                                                                   "--output_dir", str(tmp_path / "file" / "sub")))
    _refused(r"--output_dir /proc/x: cannot write in /proc", *_compare(tiny_dir, "--config", "format=mxfp4",
                                                                      "--output_dir", "/proc/x"))


@NO_PROC
@pytest.mark.parametrize("command", [["search", "--candidates", "fp4,fp8", "--bits", "6"],
                                     ["divergence", "--config", "format=mxfp4"]])
def test_search_and_divergence_output_checked_first(command, monkeypatch):
    _no_load(monkeypatch)
    _refused(r"--output /proc/x\.json: its directory /proc: cannot write in /proc", *command, "--model_args",
             "pretrained=/no/such/model", "--device", "cpu", "--output", "/proc/x.json")


def test_compare_labels_and_checkpoint_paths(tmp_path, tiny_dir, packed, monkeypatch):
    from lm_eval_mx.commands.compare import parse_checkpoints

    _no_load(monkeypatch)
    _refused(r"'rtn' comes twice", *_compare(tiny_dir, "--checkpoint", packed, "--checkpoint", packed))
    _refused(r"'baseline' comes twice", *_compare(tiny_dir, "--checkpoint", f"baseline={packed}"))
    _refused(r"'fp4_e2m1' comes twice", *_compare(tiny_dir, "--config", "format=mxfp4",
                                                  "--checkpoint", f"fp4_e2m1={packed}"))
    odd = tmp_path / "ck=1"
    shutil.copytree(packed, odd)
    assert parse_checkpoints([str(odd)]) == [("ck=1", str(odd))]  # a path holding '=' is not split


def test_compare_checkpoint_of_another_model_refused(tmp_path, tiny_dir, monkeypatch):
    gpt2 = tmp_path / "gpt2"
    AutoModelForCausalLM.from_pretrained(save_tiny(tmp_path / "g", "gpt2"), quantization_config=MXQuantizationConfig(
        format="mxfp4")).save_pretrained(gpt2)
    _no_load(monkeypatch)
    _refused(r"--checkpoint gpt2=.* is not a quantized copy of the baseline's model: model_type gpt2 \(baseline llama",
             *_compare(tiny_dir, "--checkpoint", f"gpt2={gpt2}"))


def test_model_differences_ignore_fields_a_config_leaves_unset():
    """A baseline read from a GGUF file has no ``architectures``: its quantized copy is still the same model."""
    from lm_eval_mx.commands.compare import model_differences

    gguf = {"model_type": "llama", "architectures": None, "vocab_size": 320, "hidden_size": 64, "num_hidden_layers": 2}
    ck = {**gguf, "architectures": ["LlamaForCausalLM"]}
    assert model_differences(gguf, ck) == []
    assert model_differences(gguf, {**ck, "num_hidden_layers": 3}) == ["num_hidden_layers 3 (baseline 2)"]


def test_compare_checkpoint_that_does_not_load_fails_before_the_baseline(tmp_path, tiny_dir, packed, monkeypatch):
    """Config and tensors disagree (its roles edited): the failure comes before any evaluation."""
    import lm_eval

    bad = _edited(packed, tmp_path, lambda qc: qc["mx"].update(roles=["attn_qkv", "attn_out", "mlp_up", "mlp_down"]))
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda *a, **k: pytest.fail("evaluated"))
    _refused(r"--checkpoint bad=.* does not load: ValueError: packed MX checkpoint: model\.layers\.0\.self_attn\.q_proj"
             r"\.weight is stored as \w+ \[", *_compare(tiny_dir, "--checkpoint", f"bad={bad}", "--limit", "1"))


# --- hf-mx: edited packed checkpoints name the tensor or the config, before weights load -------------------------

def _edited(packed: str, tmp_path: Path, edit_qc=None, edit_tensors=None) -> str:
    out = tmp_path / "edited"
    shutil.copytree(packed, out)
    cfg = json.loads((out / "config.json").read_text())
    if edit_qc is not None and edit_qc(cfg["quantization_config"]) == "drop":
        del cfg["quantization_config"]
    (out / "config.json").write_text(json.dumps(cfg))
    if edit_tensors is not None:
        sd = load_file(out / "model.safetensors")
        edit_tensors(sd)
        save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    return str(out)


@pytest.mark.parametrize(("edit", "match"), [
    (lambda qc: qc.pop("mx"), r"has no 'mx' object"),
    (lambda qc: qc.update(mx=None), r"has no 'mx' object"),
    (lambda qc: "drop", r"holds packed MX tensors \(e\.g\. .*_scales\) but its config\.json has no quantization_config"),
    (lambda qc: qc["mx"].update(roles=["mlp_up"]), r"model\.layers\.0\.mlp\.down_proj\.weight_scales holds packed "
                                                   r"scales of model\.layers\.0\.mlp\.down_proj, which its config does"),
    (lambda qc: qc["mx"].update(exclude="layers\\.1\\."), r"model\.layers\.1\.mlp\.\w+\.weight_scales holds packed"),
    (lambda qc: qc["mx"].update(roles=["mlp_up", "mlp_down", "lm_head"]), r"lm_head\.weight is stored as \w+ \[\d+, "
                                                                           r"64\], its config .* makes it U8"),
])
def test_edited_packed_checkpoint_names_what_disagrees(tmp_path, packed, edit, match):
    bad = _edited(packed, tmp_path, edit)
    with pytest.raises(ValueError, match=match):
        HFMXLM(pretrained=bad, device="cpu", dtype="float32")


def test_wrong_shape_is_named(tmp_path, packed):
    key = "model.layers.0.mlp.up_proj.weight_scales"
    bad = _edited(packed, tmp_path, edit_tensors=lambda sd: sd.__setitem__(key, sd[key][:, :-1].clone()))
    with pytest.raises(ValueError, match=rf"{re.escape(key)} is stored as U8 \[96, 1\], its config .* makes it U8 "
                                         r"\[96, 2\]"):
        AutoModelForCausalLM.from_pretrained(bad)


def test_gguf_and_keep_original_beside_a_packed_checkpoint(packed, monkeypatch):
    monkeypatch.setattr("lm_eval_mx.hf.model.HFLM.__init__", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(ValueError, match=r"\(packed MX weights\) cannot be combined with gguf_file"):
        HFMXLM(pretrained=packed, device="cpu", gguf_file="model.gguf")
    with pytest.raises(ValueError, match=r"\(packed MX weights\) holds only quantized codes.*compare --checkpoint") as e:
        HFMXLM(pretrained=packed, device="cpu", mx_keep_original=True)
    assert "packed=True" not in str(e.value)


def test_layer_formats_takes_a_compiled_pattern():
    from lm_eval_mx.selection.config import parse_mx_args

    config, _ = parse_mx_args({"layer_formats": [(re.compile(r"mlp\.down_proj$"), "fp4")]})
    assert config.layer_formats == ((r"mlp\.down_proj$", "fp4_e2m1"),)
    assert config.formats_for("mlp_down", "model.layers.0.mlp.down_proj") == ("fp4_e2m1", "fp4_e2m1")


# --- shipped checkpoints: bad weight scales and disagreeing configs are refused ----------------------------------

def _modelopt(tmp_path, tiny_dir) -> str:
    from test_shipped import write_modelopt

    out = str(tmp_path / "mo")
    write_modelopt(tiny_dir, out)
    return out


@pytest.mark.parametrize("value", [0.0, -0.01, float("nan")])
def test_modelopt_weight_scale_2_not_positive(tmp_path, tiny_dir, value):
    out = _modelopt(tmp_path, tiny_dir)
    key = "model.layers.0.mlp.up_proj.weight_scale_2"
    sd = load_file(f"{out}/model.safetensors")
    sd[key] = torch.tensor(value)
    save_file(sd, f"{out}/model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj: weight_scale_2 = .* must be finite and > 0"):
        HFMXLM(pretrained=out, device="cpu", dtype="float32")


def test_ct_weight_global_scale_negative(tmp_path, tiny_dir):
    from test_shipped import write_ct

    out = str(tmp_path / "ct")
    write_ct(tiny_dir, out, "NVFP4")
    key = "model.layers.1.self_attn.o_proj.weight_global_scale"
    sd = load_file(f"{out}/model.safetensors")
    sd[key] = -sd[key]
    save_file(sd, f"{out}/model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"o_proj: weight_global_scale = \[-.* must be finite and > 0"):
        HFMXLM(pretrained=out, device="cpu", dtype="float32")


def test_hf_quant_config_disagreeing_with_config_json(tmp_path, tiny_dir, monkeypatch):
    out = _modelopt(tmp_path, tiny_dir)
    side = json.loads(Path(out, "hf_quant_config.json").read_text())
    side["quantization"]["exclude_modules"] = ["lm_head", "model.layers.0.mlp.down_proj"]
    Path(out, "hf_quant_config.json").write_text(json.dumps(side))
    monkeypatch.setattr("lm_eval_mx.hf.model.HFLM.__init__", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(ValueError, match=r"config\.json's quantization_config .* and hf_quant_config\.json .*disagree"):
        HFMXLM(pretrained=out, device="cpu")

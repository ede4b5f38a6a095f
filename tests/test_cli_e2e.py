"""Every launch form of hf-mx, run for real in subprocesses on a tiny local model, offline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TASKS = str(ROOT / "tasks")
BIN = Path(sys.executable).parent


def env() -> dict[str, str]:
    e = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
             TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    e.pop("LM_EVAL_MX_AUTOLOAD", None)
    return e


def installed() -> bool:
    """The autoload hook (lm_eval_mx.pth) is only active when the package is installed."""
    import site

    dirs = [*site.getsitepackages(), site.getusersitepackages()]
    return any(Path(d, "lm_eval_mx.pth").exists() for d in dirs)


needs_install = pytest.mark.skipif(not installed(), reason="lm-eval-mx is not pip-installed in this environment")


def run(cmd: list[str], out: Path, timeout: int = 300, extra_env: dict[str, str] | None = None) -> dict:
    proc = subprocess.run(cmd, env={**env(), **(extra_env or {})}, capture_output=True, text=True,
                          timeout=timeout, cwd=out)
    assert proc.returncode == 0, f"{cmd}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-5000:]}"
    files = sorted(out.rglob("results_*.json"))
    assert files, f"no results file under {out}\n{proc.stderr[-3000:]}"
    return json.loads(files[-1].read_text())


def lm_eval_args(model_dir: str, out: Path, mx: str = "mlp_only=True") -> list[str]:
    return ["--model", "hf-mx", "--model_args", f"pretrained={model_dir},{mx}", "--device", "cpu", "--tasks",
            "mx_corpus_ppl", "--limit", "3", "--batch_size", "2", "--output_path", str(out)]


def check_results(res: dict, w_format: str = "fp8_e4m3") -> None:
    cfg = res["config"]
    assert cfg["model"] == "hf-mx"
    assert cfg["mx_config"]["w_format"] == w_format
    assert cfg["mx_report"]["layers_per_role"] == {"mlp_down": 2, "mlp_up": 4}
    assert "bits_per_byte,none" in res["results"]["mx_corpus_ppl"]


@needs_install
@pytest.mark.slow
@pytest.mark.parametrize("form", ["lm_eval", "lm-eval run", "python -m lm_eval", "lm-eval-mx", "accelerate"])
def test_launch_forms(form, tiny_dir, tmp_path):
    args = lm_eval_args(tiny_dir, tmp_path)
    if form == "lm_eval":
        cmd = [str(BIN / "lm_eval"), *args, "--include_path", TASKS]
    elif form == "lm-eval run":
        cmd = [str(BIN / "lm-eval"), "run", *args, "--include_path", TASKS]
    elif form == "python -m lm_eval":
        cmd = [sys.executable, "-m", "lm_eval", *args, "--include_path", TASKS]
    elif form == "lm-eval-mx":
        cmd = [str(BIN / "lm-eval-mx"), "run", *args]  # adds our tasks itself
    else:
        if not shutil.which("accelerate", path=str(BIN)):
            pytest.skip("accelerate CLI not installed")
        cmd = [str(BIN / "accelerate"), "launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "lm_eval", *args, "--include_path", TASKS]
    check_results(run(cmd, tmp_path))


@needs_install
@pytest.mark.slow
def test_opt_out_env_var(tiny_dir, tmp_path):
    cmd = [sys.executable, "-m", "lm_eval", *lm_eval_args(tiny_dir, tmp_path), "--include_path", TASKS]
    proc = subprocess.run(cmd, env={**env(), "LM_EVAL_MX_AUTOLOAD": "0"}, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    # lm-eval's own refusal of an unregistered model, not any crash
    assert proc.returncode != 0
    assert "Attempted to load model 'hf-mx', but no model for this name found" in proc.stdout + proc.stderr, (
        proc.stderr[-3000:])
    assert not list(tmp_path.rglob("results_*.json"))


@needs_install
@pytest.mark.parametrize("value,registered", [("0", False), (None, True)])
def test_opt_out_env_var_decides_registration(value, registered):
    """LM_EVAL_MX_AUTOLOAD=0 leaves hf-mx out of lm-eval's registry; without it the hook registers hf-mx."""
    code = ("import lm_eval.models; from lm_eval.api.registry import model_registry;"
            "print('hf-mx' in model_registry, 'hf' in model_registry)")
    extra = {} if value is None else {"LM_EVAL_MX_AUTOLOAD": value}
    out = subprocess.run([sys.executable, "-c", code], env={**env(), **extra}, capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.split() == [str(registered), "True"], out.stderr


@needs_install
def test_import_lm_eval_registers_without_importing_torch():
    code = ("import sys, lm_eval.models; from lm_eval.api.registry import model_registry;"
            "print('hf-mx' in model_registry, 'hf' in model_registry, 'lm_eval_mx.hf.model' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["True", "True", "False"], out.stderr


def test_simple_evaluate_in_process(tiny_dir):
    import lm_eval

    import lm_eval_mx._autoload as autoload

    autoload.register()
    res = lm_eval.simple_evaluate(
        model="hf-mx", model_args={"pretrained": tiny_dir, "device": "cpu", "mlp_only": True},
        tasks=["mx_corpus_ppl"], limit=3, task_manager=lm_eval.tasks.TaskManager(include_path=TASKS),
    )
    check_results(res)


def test_bad_model_arg_is_a_clear_error(tiny_dir, tmp_path):
    cmd = [sys.executable, "-m", "lm_eval_mx.commands.cli", "run",
           *lm_eval_args(tiny_dir, tmp_path, mx="w_format=fp5")]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode != 0
    assert "unknown MX element format 'fp5'; valid formats: fp4_e2m1" in proc.stderr


@needs_install
@pytest.mark.slow
def test_two_cpu_processes(tiny_dir, tmp_path):
    """Two processes (torch.distributed.run; ``accelerate launch --cpu --num_processes 2`` starts only one):
    one results file, with the MX config, the same metric as one process.

    (lm-eval shards requests only across GPUs; on CPU each process scores everything.)
    """
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    single = run([sys.executable, "-m", "lm_eval", *lm_eval_args(tiny_dir, one), "--include_path", TASKS], one)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "lm_eval",
           *lm_eval_args(tiny_dir, two), "--include_path", TASKS]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300, cwd=two)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[rank1]" in proc.stderr  # a second process really ran
    files = list(two.rglob("results_*.json"))
    assert len(files) == 1
    double = json.loads(files[0].read_text())
    check_results(double)
    key = "bits_per_byte,none"
    assert double["results"]["mx_corpus_ppl"][key] == single["results"]["mx_corpus_ppl"][key]

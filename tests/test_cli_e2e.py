"""The launch forms of hf-mx on a tiny local model, offline: one (``lm-eval run``) run for real in a subprocess,
the others (``lm_eval``, ``python -m lm_eval``, ``accelerate launch -m lm_eval``, ``lm-eval-mx run``) checked to
reach the same lm-eval CLI with hf-mx registered; the autoload hook and its opt-out in fresh interpreters."""

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
def test_launch_form_end_to_end(tiny_dir, tmp_path):
    """One launch form run for real: ``lm-eval run`` in a fresh interpreter finds hf-mx through the installed
    autoload hook (lm_eval_mx.pth), loads the tiny model with MX and scores an offline task."""
    check_results(run([str(BIN / "lm-eval"), "run", *lm_eval_args(tiny_dir, tmp_path), "--include_path", TASKS],
                      tmp_path))


@needs_install
def test_other_launch_forms_reach_the_same_cli():
    """The other launch forms start the same lm-eval CLI in a fresh interpreter, where the hook registers hf-mx
    (test_import_lm_eval_registers_without_importing_torch): ``lm_eval`` and ``lm-eval`` are one console script,
    ``python -m lm_eval`` and ``accelerate launch -m lm_eval`` run lm_eval.__main__, whose cli_evaluate it is."""
    from importlib.metadata import entry_points

    import lm_eval.__main__

    scripts = {e.name: e.value for e in entry_points(group="console_scripts") if e.name in ("lm_eval", "lm-eval")}
    assert scripts == {"lm_eval": "lm_eval.__main__:cli_evaluate", "lm-eval": "lm_eval.__main__:cli_evaluate"}
    assert callable(lm_eval.__main__.cli_evaluate)
    assert (BIN / "lm_eval").exists() and (BIN / "lm-eval").exists()
    if shutil.which("accelerate", path=str(BIN)):
        from accelerate.commands.launch import launch_command_parser

        ns = launch_command_parser().parse_args(["--cpu", "--num_processes", "1", "-m", "lm_eval", "--tasks", "t"])
        assert ns.module and ns.training_script == "lm_eval"


def test_lm_eval_mx_run_hands_lm_eval_its_tasks(tiny_dir, tmp_path, monkeypatch):
    """``lm-eval-mx run ARGS`` calls lm-eval's own CLI with ``run ARGS --include_path <tasks/>`` and hf-mx
    registered (in process; the end-to-end form above runs that CLI for real)."""
    import lm_eval.__main__
    from lm_eval.api.registry import model_registry

    from lm_eval_mx.commands import cli
    from lm_eval_mx.hf.tasks import tasks_dir

    seen = {}
    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", lambda: seen.update(argv=list(sys.argv)))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    args = lm_eval_args(tiny_dir, tmp_path)
    cli.main(["run", *args])
    assert seen["argv"] == ["lm-eval", "run", *args, "--include_path", str(tasks_dir())]
    assert "hf-mx" in model_registry


@needs_install
@pytest.mark.parametrize("value,registered", [("0", False), (None, True)])
def test_opt_out_env_var_decides_registration(value, registered):
    """LM_EVAL_MX_AUTOLOAD=0 leaves hf-mx out of lm-eval's registry (so lm-eval itself refuses --model hf-mx, by
    its registry lookup; this replaces a full refused run); without it the hook registers hf-mx."""
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
    assert "Traceback" not in proc.stderr  # one line, as every lm-eval-mx command on bad input


@needs_install
@pytest.mark.slow
def test_two_cpu_processes(tiny_dir, tmp_path):
    """Two processes (torch.distributed.run; ``accelerate launch --cpu --num_processes 2`` starts only one):
    both ranks run (each writes its own log: --redirects), one results file, with the MX config, and the same
    metric as one process (computed in this process, with the same arguments).

    (lm-eval shards requests only across GPUs; on CPU each process scores everything.)
    """
    import lm_eval

    logs = tmp_path / "logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--log-dir", str(logs),
           "--redirects", "3", "-m", "lm_eval", *lm_eval_args(tiny_dir, tmp_path), "--include_path", TASKS]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    ranks = sorted(p.parent.name for p in logs.rglob("stderr.log"))
    assert proc.returncode == 0, proc.stderr[-3000:] + "".join(p.read_text()[-2000:] for p in logs.rglob("stderr.log"))
    assert ranks == ["0", "1"], ranks  # a second process really ran
    files = list(tmp_path.rglob("results_*.json"))
    assert len(files) == 1
    double = json.loads(files[0].read_text())
    check_results(double)
    single = lm_eval.simple_evaluate(
        model="hf-mx", model_args={"pretrained": tiny_dir, "device": "cpu", "mlp_only": True}, tasks=["mx_corpus_ppl"],
        limit=3, batch_size=2, task_manager=lm_eval.tasks.TaskManager(include_path=TASKS))
    key = "bits_per_byte,none"
    assert double["results"]["mx_corpus_ppl"][key] == single["results"]["mx_corpus_ppl"][key]

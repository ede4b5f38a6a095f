"""The layout's promises: public names resolve from their layers, configuration is checked without torch, and the
import contracts (pyproject's [tool.importlinter], run by `make lint`) hold and catch an upward import."""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lm_eval_mx

ROOT = Path(__file__).resolve().parents[1]


# Where each public name is defined (written here, not read from lm_eval_mx._EXPORTS, so a wrong entry fails).
DEFINED_IN = {
    "quantize_mx": "lm_eval_mx.numerics.quantize", "get_format": "lm_eval_mx.numerics.formats",
    "FORMATS": "lm_eval_mx.numerics.formats", "MXConfig": "lm_eval_mx.selection.config",
    "parse_mx_args": "lm_eval_mx.selection.config", "apply_mx": "lm_eval_mx.selection.apply",
    "MXReport": "lm_eval_mx.selection.report", "mx_disabled": "lm_eval_mx.nn.layers",
    "MXQuantizationConfig": "lm_eval_mx.hf.quantizer",
}


def test_public_names_are_the_documented_set():
    assert set(lm_eval_mx.__all__) == {"__version__", *DEFINED_IN}
    assert re.fullmatch(r"\d+\.\d+\.\d+", lm_eval_mx.__version__)


@pytest.mark.parametrize("name", sorted(DEFINED_IN))
def test_every_public_name_resolves(name):
    """Each name is the very object its layer defines (a function or class defined in that module, not a copy)."""
    module = importlib.import_module(DEFINED_IN[name])
    value = getattr(lm_eval_mx, name)
    assert value is getattr(module, name)
    if name == "FORMATS":
        assert "fp4_e2m1" in value and "fp8_e4m3" in value
    else:
        assert callable(value) and value.__module__ == DEFINED_IN[name]


def test_configuration_is_checked_without_importing_torch():
    code = ("import sys; from lm_eval_mx import parse_mx_args; parse_mx_args({'format': 'nvfp4', 'roles': 'mlp'}); "
            "import lm_eval_mx.numerics.formats; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe, "import-linter is a test dependency"
    return subprocess.run([exe], capture_output=True, text=True, cwd=root, env={"PYTHONPATH": str(root),
                                                                               "PATH": str(Path(sys.executable).parent)})


def test_import_contracts_hold_and_catch_an_upward_import(tmp_path):
    assert _lint_imports(ROOT).returncode == 0
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "lm_eval_mx", copy / "lm_eval_mx")
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    rotation = copy / "lm_eval_mx" / "numerics" / "rotation.py"
    rotation.write_text(rotation.read_text() + "\nfrom ..commands import cli  # noqa: E402,F401\n")
    broken = _lint_imports(copy)
    assert broken.returncode != 0
    assert "lm_eval_mx.numerics.rotation -> lm_eval_mx.commands.cli" in broken.stdout

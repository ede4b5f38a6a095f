"""The Triton kernels on the CPU, through Triton's interpreter (TRITON_INTERPRET=1, in a subprocess), bit for bit
against the torch reference: every scheme with every rotation (each also meeting every dtype and shape, ragged rows
included, both axes of 2-D inputs), the golden cases chosen pairwise (every pair of values of format, block,
rounding, scale bits, axis, dtype and input data the golden cases hold; it was every third case), the packed
decoder and the launch shortcut (lm_eval_mx.kernels.launch, with a fake compiled kernel running the interpreted one).
The GPU run (tests/test_gpu.py) checks the same on CUDA, all cases."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def test_kernels_match_torch_under_the_interpreter():
    if importlib.util.find_spec("triton") is None:
        if os.environ.get("CI"):
            pytest.fail("triton, a test dependency (the [test] extra), is missing in CI")
        pytest.skip("triton not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)])}
    proc = subprocess.run([sys.executable, str(HERE / "_interpret_kernels.py")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[-1] == "0 mismatches"
    counts = {line.split(":")[0]: int(line.split(":")[1].split()[0]) for line in lines[:-1]}
    assert "scheme x rotation pairs: 40 of 40" in lines
    assert counts["schemes x rotations x dtypes"] >= 50 and counts["golden cases"] >= 100
    assert counts["packed decode"] == 10
    fast = next(line for line in lines if line.startswith("fast launch:"))
    assert counts["fast launch"] == 160 and int(fast.split(", ")[1].split()[0]) > 50  # most through the launcher


def test_stack_step_orders_run_the_torch_reference(monkeypatch):
    """The Triton kernel implements hf-mx's reference E4M3 steps only: every stack's own order (e4m3_steps, Quark's
    static division included) is handed to the torch reference, on CUDA as on CPU, by the per-layer input quantizer
    too."""
    import dataclasses
    import functools

    from lm_eval_mx.kernels import backends
    from lm_eval_mx.kernels.backends import _torch_only
    from lm_eval_mx.numerics.formats import NAMED_SCHEMES, E4M3Steps, ScaleMode, TensorScale
    from lm_eval_mx.numerics.quantize import quantize_torch

    monkeypatch.setattr(backends, "triton_available", lambda: True)
    clamp = dataclasses.replace(NAMED_SCHEMES["nvfp4"], e4m3_steps=E4M3Steps.CLAMP)
    act = backends.get_act_quantizer("triton", clamp, None)
    assert isinstance(act, functools.partial) and act.func is quantize_torch

    nvfp4 = NAMED_SCHEMES["nvfp4"]
    assert not _torch_only(nvfp4) and not _torch_only(NAMED_SCHEMES["mxfp4"])
    assert _torch_only(dataclasses.replace(NAMED_SCHEMES["mxfp4"], scale_mode=ScaleMode.LOG2))  # auto-round's
    for steps in E4M3Steps:
        ts = TensorScale.STATIC if steps is E4M3Steps.QUARK else nvfp4.tensor_scale
        scheme = dataclasses.replace(nvfp4, e4m3_steps=steps, tensor_scale=ts)
        assert _torch_only(scheme) == (steps is not E4M3Steps.REFERENCE), steps

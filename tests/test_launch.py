"""The kernels' launch shortcut (lm_eval_mx.kernels.launch) on the CPU: its argument classes against Triton's own
specialization, and which calls reuse a cached compiled kernel (a fake kernel records every launch). The kernels'
results through the shortcut are checked bit for bit under the interpreter (tests/_interpret_kernels.py, ``fast``)."""

from __future__ import annotations

import itertools

import pytest
import torch

triton = pytest.importorskip("triton")
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend  # noqa: E402

from lm_eval_mx.kernels import launch  # noqa: E402

INTS = [1, 2, 3, 15, 16, 17, 32, 48, 4096, 16384, 16385, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16, 2**40, 2**40 + 3]


def _triton_class(v: object) -> tuple:
    return native_specialize_impl(CUDABackend, v, False, True, True)


def test_argument_classes_are_at_least_as_fine_as_tritons_specialization():
    """Two values of one class must get the same compiled kernel from Triton: same class => same specialization."""
    for a, b in itertools.product(INTS, INTS):
        if launch.int_key(a) == launch.int_key(b):
            assert _triton_class(a) == _triton_class(b), (a, b)
    buf = torch.zeros(256, dtype=torch.bfloat16)
    views = [buf[i:] for i in range(0, 17)]
    for a, b in itertools.product(views, views):
        if launch.ptr_key(a) == launch.ptr_key(b):
            assert _triton_class(a) == _triton_class(b)


class FakeCompiled:
    """Stands for triton's CompiledKernel: records the launches made through its launcher."""

    def __init__(self, log: list, spec: tuple) -> None:
        self.log, self.spec = log, spec
        self.function, self.packed_metadata = "function", "metadata"

    def run(self, *call: object) -> None:
        grid, (stream, function, metadata, lm, enter, exit_), args = call[:3], call[3:9], call[9:]
        assert (function, metadata, lm, enter, exit_) == ("function", "metadata", None, None, None)
        assert tuple(_triton_class(a) for a in args[:2]) == self.spec, "a kernel compiled for other arguments"
        self.log.append(("fast", grid, stream, args))


class FakeKernel:
    """Stands for a JITFunction of parameters (x, n, A, B) with constexprs A and B."""

    arg_names = ["x", "n", "A", "B"]

    def __init__(self) -> None:
        self.log: list = []

    def __getitem__(self, grid: tuple):
        def call(*args: object, **kwargs: object) -> FakeCompiled:
            self.log.append(("plain", grid, args, kwargs))
            return FakeCompiled(self.log, tuple(_triton_class(a) for a in args[:2]))

        return call


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(launch, "FAST", True)
    monkeypatch.setattr(launch, "CompiledKernel", FakeCompiled)
    device = [0]
    monkeypatch.setattr(launch, "_device", lambda: device[0])
    monkeypatch.setattr(launch, "_stream", lambda d: 100 + d)
    kernel = FakeKernel()
    return kernel, launch.Launch(kernel, {"B": 2, "A": 1, "num_warps": 4}), device


def _call(lau: launch.Launch, x: torch.Tensor, n: int) -> None:
    lau(7, (x, n), (launch.ptr_key(x), launch.int_key(n)))


def test_first_call_compiles_then_the_launcher_runs_with_the_same_arguments(fake):
    kernel, lau, _ = fake
    x = torch.zeros(64)
    _call(lau, x, 32)
    _call(lau, x, 48)  # same class as 32
    assert kernel.log[0] == ("plain", (7,), (x, 32), {"B": 2, "A": 1, "num_warps": 4})
    assert kernel.log[1] == ("fast", (7, 1, 1), 100, (x, 48, 1, 2))  # constexprs after, in the kernel's order
    assert len(kernel.log) == 2


def test_a_new_argument_class_or_device_compiles_again(fake):
    kernel, lau, device = fake
    x = torch.zeros(64)
    for n in (32, 33, 2**31 + 16, 1):  # multiple of 16, not, 64-bit, the value 1
        _call(lau, x, n)
        _call(lau, x, n)
    _call(lau, x[1:], 32)  # not 16-byte aligned
    _call(lau, x[1:], 32)
    device[0] = 1
    _call(lau, x, 32)
    _call(lau, x, 32)
    kinds = [e[0] for e in kernel.log]
    assert kinds == ["plain", "fast"] * 6
    assert kernel.log[-1][2] == 101  # device 1's stream


def test_plain_path_when_switched_off_traced_or_hooked(fake, monkeypatch):
    from lm_eval_mx.kernels.triton_mx import _launch

    kernel, lau, _ = fake
    x = torch.zeros(64)
    _call(lau, x, 32)
    monkeypatch.setattr(launch, "FAST", False)
    _call(lau, x, 32)
    monkeypatch.setattr(launch, "FAST", True)
    _launch(lau, 7, (x, 32), None)  # what quantize_triton passes while torch.compile traces it
    monkeypatch.setattr(launch, "hooks_idle", lambda: False)  # a profiler's launch hook
    _call(lau, x, 32)
    assert [e[0] for e in kernel.log] == ["plain"] * 4


def test_a_copied_or_pickled_layer_quantizer_starts_without_launchers():
    """Deep copies of an MX model (benchmarks make them) must not copy compiled kernels' device handles."""
    import copy
    import pickle

    from lm_eval_mx.kernels.triton_mx import ActQuantizer
    from lm_eval_mx.numerics.formats import NAMED_SCHEMES
    from lm_eval_mx.numerics.rotation import Rotation

    aq = ActQuantizer(NAMED_SCHEMES["nvfp4"], Rotation(16, 3))
    aq.plans[(64, torch.bfloat16)] = object()  # stands for a plan holding launchers (not copyable)
    for other in (copy.deepcopy(aq), pickle.loads(pickle.dumps(aq))):
        assert other.plans == {} and other.scheme == aq.scheme and other.rotation == aq.rotation

"""The Python host time of one MX activation call, measured on a machine without a GPU (a lower bound of the
GPU machine's host time: the driver's launch and CUDA's allocation are not in it).

Triton's driver is replaced by a fake one (device 0, stream 0, an sm_90 target) and compilation by a fake
compiled kernel whose launcher does nothing, so ``kernel[grid](...)`` runs all of ``JITFunction.run`` (binding,
specialization, cache key, launch metadata) and the call ends where the GPU machine would enter the C launcher.
Variants, timed in turns in one process (median of rounds, µs per call, CPU tensors of 8 x 1 x 2048 bf16):

- ``act_quantizer``: the layer's input quantizer (``ActQuantizer.triton``), cached launcher (``launch.FAST``);
- ``act_quantizer, JITFunction.run``: the same with every launch through ``kernel[grid]``;
- ``old commit``: ``quantize_triton`` of an earlier commit's package (``--old DIR``, see host_profile.py).

``--profile``: cProfile of 2,000 MXFP8 calls of each variant instead, functions by own time.

    python benchmarks/host_cpu.py --old /tmp/old [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import time

import torch
import triton
from host_profile import _old_package, _specs
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction

from lm_eval_mx.kernels import launch
from lm_eval_mx.kernels.triton_mx import ActQuantizer
from lm_eval_mx.nn import spec as spec_mod


class _FakeCompiled:
    function = packed_metadata = None

    def run(self, *args: object) -> None:  # the C launcher's place
        pass

    def launch_metadata(self, *args: object) -> None:
        return None


class _FakeDriver:
    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)


def _fake_compile(self: JITFunction, key: str, signature: dict, device: int, *args: object) -> _FakeCompiled:
    """Stores a fake compiled kernel where triton's own compilation would (later calls find it)."""
    kernel = self.device_caches[device][0][key] = _FakeCompiled()
    return kernel


def _install_fakes() -> None:
    triton.runtime.driver.set_active(_FakeDriver())
    JITFunction._do_compile = _fake_compile
    launch.CompiledKernel = _FakeCompiled
    launch._device, launch._stream = (lambda: 0), (lambda device: 0)


def _profile(name: str, fn, fast: bool, calls: int) -> None:
    launch.FAST = fast
    fn()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(12)
    print(f"== {name}: cProfile of {calls} calls")
    print("\n".join(line for line in out.getvalue().splitlines()[4:] if line.strip()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", default=None, help="directory holding an earlier commit's lm_eval_mx package")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--profile", action="store_true")
    ns = p.parse_args()
    _install_fakes()
    x = torch.randn(8, 1, 2048, dtype=torch.bfloat16)
    fns = {}
    olds = _specs(_old_package(ns.old)) if ns.old else {}
    old_tq = __import__("lm_eval_mx_old.kernels.triton_mx", fromlist=["quantize_triton"]) if ns.old else None
    for name, s in _specs(spec_mod).items():
        aq = ActQuantizer(s.a, s.rotation)
        fns[f"{name} act_quantizer"] = (lambda aq=aq: aq.triton(x), True)
        fns[f"{name} act_quantizer, JITFunction.run"] = (lambda aq=aq: aq.triton(x), False)
        if name in olds:
            o = olds[name]
            fns[f"{name} old commit quantize_triton"] = (lambda o=o: old_tq.quantize_triton(x, o.a, -1, o.rotation), True)
    if ns.profile:
        for n, (fn, fast) in fns.items():
            if n.startswith("MXFP8"):
                _profile(n, fn, fast, ns.calls)
        return
    times: dict[str, list[float]] = {n: [] for n in fns}
    for _ in range(ns.rounds):
        for n, (fn, fast) in fns.items():
            launch.FAST = fast
            t0 = time.perf_counter()
            for _ in range(ns.calls):
                fn()
            times[n].append((time.perf_counter() - t0) / ns.calls * 1e6)
    print(json.dumps({"cpu_host_us_per_call": {n: round(statistics.median(t), 2) for n, t in times.items()},
                      "triton": triton.__version__, "torch": torch.__version__}, indent=1))


if __name__ == "__main__":
    main()

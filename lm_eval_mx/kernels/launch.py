"""Launching a Triton kernel with the least Python between the caller and the driver.

``kernel[grid](*args, **kwargs)`` runs ``JITFunction.run`` on every call: it binds ~25 arguments, computes
their specialization and the cache key, and looks the compiled kernel up (most of an MX call's ~27 µs of
host time, BENCHMARKS.md). :class:`Launch` does that once: the first call of each argument class goes
through ``kernel[grid]`` (which compiles), returns the ``CompiledKernel``, and later calls of the same class
call its launcher (``CompiledKernel.run``) with the same arguments, as ``JITFunction.run`` itself does
(triton 3.6 to 3.9). Same kernel binary, same arguments: the same bits.

The class of a call is what Triton specializes a compiled kernel on: the device, and for each argument
that changes between calls its ``arg_key`` (an integer: 1, a multiple of 16, 32- or 64-bit; a tensor:
16-byte aligned). tests/test_launch.py checks that this partition is at least as fine as Triton's own
(``native_specialize_impl``). Under ``torch.compile`` (the callers' ``plain``), while a launch hook is set
(profilers), under the interpreter, or with ``LM_EVAL_MX_FAST_LAUNCH=0`` every call takes ``kernel[grid]``.
"""

from __future__ import annotations

import os
from typing import Any

import torch

try:  # the compiled-kernel class and the launch hooks: the launcher is used only when both are as expected
    from triton import knobs
    from triton.compiler import CompiledKernel
except ImportError:  # pragma: no cover - triton without knobs (older than 3.3): always the plain path
    knobs, CompiledKernel = None, None
_HookChain = getattr(knobs, "HookChain", None)  # triton 3.9's hook holder (3.6: a hook or None)

# Read at import (the interpreter runs kernels without compiling them); benchmarks flip it to time both paths.
FAST = os.environ.get("LM_EVAL_MX_FAST_LAUNCH", "1") != "0" and not (knobs is not None and knobs.runtime.interpret)


def _device() -> int:
    return torch.cuda.current_device()  # what triton's driver launches on


def _stream(device: int) -> int:
    return torch._C._cuda_getCurrentRawStream(device)


def _idle(hook: Any) -> bool:
    """No launch hook: None (triton 3.6) or an empty HookChain (3.9)."""
    return hook is None or (type(hook) is _HookChain and not hook.calls)


def hooks_idle() -> bool:
    return knobs is not None and _idle(knobs.runtime.launch_enter_hook) and _idle(knobs.runtime.launch_exit_hook)


def int_key(v: int) -> int:
    """An integer argument's class: 1, a multiple of 16, and 32 or 64 bits (as Triton specializes it)."""
    return (v == 1) | ((v & 15 == 0) << 1) | ((-(2**31) <= v < 2**31) << 2)


def ptr_key(t: torch.Tensor) -> bool:
    """A tensor argument's class: 16-byte aligned."""
    return t.data_ptr() & 15 == 0


class Launch:
    """``kernel[(grid,)](*args, **kwargs)`` with ``kwargs`` fixed (constexprs, launch options); ``args`` are the
    kernel's leading parameters, in order. The caller passes the class ``key`` of the arguments that vary
    (``int_key``/``ptr_key`` of each); arguments it leaves out of the key must keep their class."""

    def __init__(self, kernel: Any, kwargs: dict[str, Any]) -> None:
        self.kernel = kernel
        self.kwargs = kwargs
        self.cache: dict[tuple, tuple] = {}

    def _tail(self, n_args: int) -> tuple:
        """The values of the parameters after the ``n_args`` given ones, in the kernel's order."""
        return tuple(self.kwargs[name] for name in self.kernel.arg_names[n_args:])

    def __call__(self, grid: int, args: tuple, key: tuple) -> None:
        """Launch from eager code (callers that may be traced by torch.compile check ``is_compiling`` and call
        :meth:`plain` there: dynamo traces ``kernel[grid]``, not the launcher)."""
        if not FAST:
            self.kernel[(grid,)](*args, **self.kwargs)
            return
        device = _device()
        hit = self.cache.get((device, *key))
        if hit is not None and hooks_idle():
            run, function, metadata, tail = hit
            run(grid, 1, 1, _stream(device), function, metadata, None, None, None, *args, *tail)
            return
        compiled = self.kernel[(grid,)](*args, **self.kwargs)
        if CompiledKernel is not None and isinstance(compiled, CompiledKernel) and hooks_idle():
            self.cache[(device, *key)] = (compiled.run, compiled.function, compiled.packed_metadata,
                                          self._tail(len(args)))

    def plain(self, grid: int, args: tuple) -> None:
        self.kernel[(grid,)](*args, **self.kwargs)

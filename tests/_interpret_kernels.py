"""Run by tests/test_kernels.py in a subprocess with TRITON_INTERPRET=1: the Triton kernels' arithmetic on the CPU,
checked bit for bit against the torch reference. Prints one line per check and exits non-zero on a mismatch."""

from __future__ import annotations

import itertools
import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lm_eval_mx.kernels.triton_mx import mx_unpack_triton, quantize_triton  # noqa: E402
from lm_eval_mx.numerics.formats import NAMED_SCHEMES  # noqa: E402
from lm_eval_mx.numerics.packing import pack, unpack_mx  # noqa: E402
from lm_eval_mx.numerics.quantize import make_scheme, quantize_torch  # noqa: E402
from lm_eval_mx.numerics.rotation import Rotation  # noqa: E402

FAILS: list[str] = []


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.float(), b.float()
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a[~a.isnan()].view(torch.int32), b[~b.isnan()].view(torch.int32))


def check(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    if not same(got, want):
        FAILS.append(name)
        print("MISMATCH", name, file=sys.stderr)


def schemes_and_rotations() -> None:
    g = torch.Generator().manual_seed(0)
    schemes = [make_scheme("fp8_e4m3"), make_scheme("fp4_e2m1", 32, "nearest"), make_scheme("int4", 16, "floor"),
               make_scheme("fp6_e2m3", 32, scale_mode="rceil"), make_scheme("fp8_e5m2", 8, scale_mode="ceil", scale_bits=6),
               make_scheme("fp4_e2m1", 32, scale_mode="even"), NAMED_SCHEMES["nvfp4"],
               make_scheme("fp4_e2m1", 16, scale_format="e4m3"), make_scheme("int8", 0),
               make_scheme("fp8_e4m3", 32, "floor", scale_format="e4m3", tensor_scale="amax")]
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    rotations = [None, Rotation(16), Rotation(32, 7), Rotation(0, 3)]
    even, ragged = [(4, 64), (2, 3, 128), (5, 96)], [(3, 100), (1, 24)]  # ragged rows: no rotation block divides
    n, pairs = 0, set()
    # every scheme with every rotation; the dtypes and shapes in turn, so each also meets every scheme and rotation
    grid = [((ragged if rot is None else even)[(i + j) % (2 if rot is None else 3)], scheme, dtypes[(i + j) % 3], rot)
            for i, scheme in enumerate(schemes) for j, rot in enumerate(rotations)]
    for shape, scheme, dtype, rot in grid:
        x = (torch.randn(*shape, generator=g) * torch.exp2(torch.randint(-6, 7, (*shape[:-1], 1), generator=g).float()))
        x[..., :3] = torch.tensor([0.0, -0.0, 1e-3])
        x = x.to(dtype)
        for axis in (-1, 0) if x.dim() == 2 else (-1,):
            try:
                want = quantize_torch(x, scheme, axis, rot)
            except ValueError:  # a rotation block that does not divide the row: refused alike
                continue
            check(f"{scheme.name} {tuple(shape)} {dtype} {rot} axis={axis}", quantize_triton(x, scheme, axis, rot), want)
            n += 1
            pairs.add((repr(scheme), str(rot)))
    print(f"schemes x rotations x dtypes: {n} cases")
    print(f"scheme x rotation pairs: {len(pairs)} of {len(schemes) * len(rotations)}")


GOLDEN_KEYS = ("elem_format", "block_size", "round", "scale_bits", "axis", "dtype", "input")


def pairwise(cases: list[dict]) -> list[dict]:
    """A subset of the golden cases holding every pair of values (format, block, rounding, scale bits, axis, dtype,
    input data) that the cases hold: greedy, each step the case adding the most new pairs (first one on ties)."""
    def pairs(c: dict) -> set[tuple[str, str, str, str]]:
        return {(a, str(c[a]), b, str(c[b])) for a, b in itertools.combinations(GOLDEN_KEYS, 2)}

    each = [pairs(c) for c in cases]
    left = set().union(*each)
    chosen: list[int] = []
    while left:
        i = max(range(len(cases)), key=lambda k: (len(each[k] & left), -k))
        chosen.append(i)
        left -= each[i]
    return [cases[i] for i in sorted(chosen)]


def golden_subset() -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    from test_numerics import _DATA, CASES

    n = 0
    # the interpreter converts float32 to bfloat16 by truncation, without subnormals: those cases run on CUDA only
    runnable = [c for c in CASES if not (c["dtype"] == "bfloat16" and "special" in c["key"])]
    for case in pairwise(runnable):
        x = torch.from_numpy(_DATA[case["input"]])
        if case["dtype"] == "bfloat16":
            x = x.to(torch.bfloat16)
        scheme = make_scheme(case["elem_format"], case["block_size"], case["round"], case["scale_bits"])
        got = quantize_triton(x, scheme, case["axis"]).float().numpy()
        want = _DATA[case["key"]]
        if not (np.array_equal(np.isnan(got), np.isnan(want))
                and np.array_equal(got[~np.isnan(got)].view(np.uint32), want[~np.isnan(want)].view(np.uint32))):
            FAILS.append(case["key"])
            print("MISMATCH", case["key"], file=sys.stderr)
        n += 1
    print(f"golden cases: {n}")


def packed_decode() -> None:
    g = torch.Generator().manual_seed(2)
    n = 0
    for scheme in (make_scheme("fp4_e2m1"), make_scheme("fp6_e3m2", 16), make_scheme("int2"), NAMED_SCHEMES["nvfp4"],
                   make_scheme("fp8_e4m3", 32, scale_format="e4m3")):
        w = torch.randn(24, 160, generator=g) * torch.exp2(torch.randint(-20, 20, (24, 1), generator=g).float())
        w[0, :32] = 0
        w[1, 5] = float("nan")
        p = pack(w, scheme)
        for dtype in (torch.float32, torch.bfloat16):
            check(f"decode {scheme.name} {dtype}", mx_unpack_triton(p, dtype), unpack_mx(p, dtype))
            n += 1
    print(f"packed decode: {n} cases")


def _fake_compiled_kernels() -> list[int]:
    """The launch shortcut with the interpreter standing in for the GPU: ``kernel[grid](...)`` returns a fake
    compiled kernel whose launcher runs the interpreted kernel on exactly the arguments it is handed (and checks
    they are of the class it was "compiled" for). Returns the list the fast launches append to."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    from lm_eval_mx.kernels import launch, triton_mx

    fast: list[int] = []

    def spec(args: tuple) -> list:
        return [native_specialize_impl(CUDABackend, a, False, True, True) for a in args if not isinstance(a, float)]

    class Compiled:
        function = packed_metadata = None

        def __init__(self, kernel, args: tuple) -> None:
            self.kernel, self.n, self.spec = kernel, len(args), spec(args)  # args: the non-constexpr ones

        def run(self, gx, gy, gz, stream, function, metadata, lm, enter, exit_, *args) -> None:
            assert spec(args[: self.n]) == self.spec, "a kernel compiled for other arguments"
            fast.append(1)
            self.kernel[(gx, gy, gz)](*args)

    class Kernel:
        def __init__(self, kernel) -> None:
            self.kernel, self.arg_names = kernel, kernel.arg_names

        def __getitem__(self, grid):
            def call(*args, **kwargs):
                self.kernel[grid](*args, **kwargs)
                return Compiled(self.kernel, args)

            return call

    launch.FAST, launch.CompiledKernel = True, Compiled
    launch._device, launch._stream = (lambda: 0), (lambda device: 0)
    triton_mx._mx_flat_kernel = Kernel(triton_mx._mx_flat_kernel)
    triton_mx._amax_flat_kernel = Kernel(triton_mx._amax_flat_kernel)
    return fast


def fast_launch() -> None:
    """Every call made twice (the second through the cached launcher) equals the torch reference bit for bit, for
    whole and ragged last tiles, small and large tiles, a per-tensor scale (taken in the kernel, and by the maximum
    pass), rotations with and without signs, bf16/fp32 and an input not 16-byte aligned; the per-layer quantizer's plans follow the row
    length and dtype."""
    from lm_eval_mx.kernels import triton_mx

    fast = _fake_compiled_kernels()
    g = torch.Generator().manual_seed(5)
    nvfp4 = [(NAMED_SCHEMES["nvfp4"], None), (NAMED_SCHEMES["nvfp4"], Rotation(16, 3))]
    cases = [(make_scheme("fp8_e4m3"), None), (make_scheme("fp4_e2m1", 32, "nearest"), Rotation(32)), *nvfp4,
             (make_scheme("int8", 0), None)]
    local, small = triton_mx.LOCAL_MAX_ELEMENTS, triton_mx.SMALL_TILE
    n = 0
    for (scheme, rot), dtype, limit in [*itertools.product(cases, [torch.bfloat16, torch.float32], [local]),
                                        *itertools.product(cases[:1] + nvfp4, [torch.bfloat16, torch.float32], [0])]:
        # limit 0: every tensor as a large one (the maximum pass, the large tile)
        triton_mx.LOCAL_MAX_ELEMENTS, triton_mx.SMALL_TILE = limit, (limit, *small[1:])
        aq = triton_mx.ActQuantizer(scheme, rot)
        for rows, cols, offset in [(64, 64, 0), (5, 64, 0), (64, 64, 1), (3, 128, 1), (3, 128, 0)]:
            buf = torch.randn(offset + rows * cols, generator=g) * 2.0 ** torch.randint(-8, 8, (1,), generator=g).item()
            x = buf.to(dtype)[offset:].view(rows, cols)
            want = quantize_torch(x, scheme, -1, rot)
            for i in range(2):
                check(f"fast {scheme.name} {rot} {dtype} {rows}x{cols}+{offset} call {i}", aq.triton(x), want)
                n += 1
        if sorted({key[:2] for key in aq.plans}) != [(64, dtype), (128, dtype)]:
            FAILS.append(f"plans of {scheme.name}: {sorted(aq.plans)}")
    triton_mx.LOCAL_MAX_ELEMENTS, triton_mx.SMALL_TILE = local, small
    print(f"fast launch: {n} cases, {len(fast)} through the cached launcher")


if __name__ == "__main__":
    for step in sys.argv[1:] or ["schemes", "golden", "decode", "fast"]:
        {"schemes": schemes_and_rotations, "golden": golden_subset, "decode": packed_decode, "fast": fast_launch}[step]()
    print(f"{len(FAILS)} mismatches")
    sys.exit(1 if FAILS else 0)

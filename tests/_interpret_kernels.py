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


if __name__ == "__main__":
    for step in sys.argv[1:] or ["schemes", "golden", "decode"]:
        {"schemes": schemes_and_rotations, "golden": golden_subset, "decode": packed_decode}[step]()
    print(f"{len(FAILS)} mismatches")
    sys.exit(1 if FAILS else 0)

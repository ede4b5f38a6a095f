"""A hash of GPTQ's outputs (weights, packed codes, scales, diagnostics) over the schemes of tests/test_gptq.py, with and
without a block-8 rotation, static/lazy scales, act_order and two block_columns, on two shapes: the check that a change
to the engine leaves its codes as they were (on CPU). At 45a35ba and after the restructure:
81b9d17a3460860fc5cbe8eb9c30d921d8fc84492d927d596f072a8d018e4f69.

    PYTHONPATH=$PWD python benchmarks/gptq_hash.py [-v]
"""
import hashlib
import sys

import torch

from lm_eval_mx.algorithms.gptq import GPTQOptions, gptq_weight
from lm_eval_mx.numerics.formats import NAMED_SCHEMES
from lm_eval_mx.numerics.quantize import make_scheme
from lm_eval_mx.numerics.rotation import Rotation

torch.set_num_threads(1)
S = {k: NAMED_SCHEMES[k] for k in ["mxfp8","mxfp8_e5m2","mxfp6_e2m3","mxfp6_e3m2","mxfp4","mxint8","mxint4","mxint2","nvfp4"]}
S.update({"fp4_row": make_scheme("fp4_e2m1", 0), "fp4_nearest_ceil": make_scheme("fp4_e2m1", 32, "nearest", 8, "ceil"),
 "int4_floor_even": make_scheme("int4", 16, "floor", 8, "even"), "fp6_rceil": make_scheme("fp6_e2m3", 32, "even", 8, "rceil"),
 "fp8_scale5": make_scheme("fp8_e4m3", 32, "even", 5), "fp4_e4m3_noamax": make_scheme("fp4_e2m1", 16, "even", 8, "floor", "e4m3", "none"),
 "int8_e4m3_amax_nearest": make_scheme("int8", 32, "nearest", 8, "floor", "e4m3", "amax")})
total = hashlib.sha256()
g = torch.Generator().manual_seed(0)
for n_in, out in [(256, 48), (200, 24)]:
    x = torch.randn(512, n_in, generator=g) @ (torch.randn(n_in, n_in, generator=g) * 0.3 + torch.eye(n_in))
    x[:, 5] = 0
    h = 2 * x.T @ x / 512
    w = torch.randn(out, n_in, generator=g) * 0.05
    w[3, 7] = float("nan") if n_in == 200 else w[3, 7]
    for name, sch in S.items():
        for rot in (None, Rotation(8, seed=3)):
            if rot is not None and n_in % 8:
                continue
            for opts in (GPTQOptions(), GPTQOptions(scales="lazy"), GPTQOptions(act_order=True), GPTQOptions(block_columns=48), GPTQOptions(block_columns=48, scales="lazy")):
                r = gptq_weight(w, h, sch, rot, opts)
                hh = hashlib.sha256()
                for t in (r.weight.view(torch.int32), r.packed.codes, r.packed.scales):
                    hh.update(t.contiguous().numpy().tobytes())
                hh.update(repr((r.hessian_error, r.rtn_hessian_error, r.damping)).encode())
                total.update(hh.digest())
                if len(sys.argv) > 1:
                    print(n_in, name, rot, opts, hh.hexdigest()[:16])
print("TOTAL", total.hexdigest())

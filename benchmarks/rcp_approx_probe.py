"""Measure PTX ``rcp.approx.ftz.f32`` (the NVFP4 quantize kernels' reciprocal: vLLM csrc/quantization/fp4/
nvfp4_utils.cuh ``reciprocal_approximate_ftz``) against the correctly rounded float32 reciprocal, on this GPU.

Every float32 mantissa at exponent 0 (x in [1, 2), 2**23 values) is enough for normal inputs whose reciprocal is
normal: the result's mantissa does not depend on the exponent there. Writes $OUT/rcp_approx.json: the device,
torch/CUDA versions, the number of mantissas where rcp.approx differs from round-to-nearest, how far (ulps), and
the first differing inputs. Run: python3 benchmarks/rcp_approx_probe.py (needs CUDA and CuPy); ~1 s of GPU.
"""

import json
import os
import subprocess

import cupy as cp
import numpy as np
import torch

SRC = r"""
extern "C" __global__ void rcp(const float* x, float* approx, float* rn, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float a;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(a) : "f"(x[i]));
  approx[i] = a;
  rn[i] = __frcp_rn(x[i]);
}
"""


def main() -> None:
    n = 1 << 23
    bits = (np.uint32(127) << np.uint32(23)) | np.arange(n, dtype=np.uint32)
    x = cp.asarray(bits.view(np.float32))
    approx, rn = cp.empty_like(x), cp.empty_like(x)
    cp.RawKernel(SRC, "rcp")(((n + 255) // 256,), (256,), (x, approx, rn, np.int32(n)))
    a = cp.asnumpy(approx).view(np.int32).astype(np.int64)
    r = cp.asnumpy(rn).view(np.int32).astype(np.int64)
    diff = a - r
    bad = np.nonzero(diff)[0]
    six = np.float32(6.0)
    extra = cp.asarray(np.array([six, 448.0, 2688.0], dtype=np.float32))
    ea, er = cp.empty_like(extra), cp.empty_like(extra)
    cp.RawKernel(SRC, "rcp")((1,), (32,), (extra, ea, er, np.int32(3)))
    out = {
        "device": torch.cuda.get_device_name(0), "capability": list(torch.cuda.get_device_capability(0)),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "nvidia_smi": subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                     capture_output=True, text=True).stdout.strip(),
        "mantissas": n, "differ_from_rn": int(bad.size),
        "ulp_histogram": {str(int(k)): int(v) for k, v in zip(*np.unique(diff[bad], return_counts=True))},
        "first_differing_x_bits": [hex(int(bits[i])) for i in bad[:32]],
        "rcp_approx_of_6_448_2688_bits": [hex(int(v)) for v in cp.asnumpy(ea).view(np.uint32)],
        "rcp_rn_of_6_448_2688_bits": [hex(int(v)) for v in cp.asnumpy(er).view(np.uint32)],
    }
    if bad.size and bad.size <= 200000:
        np.save(os.path.join(os.environ.get("OUT", "."), "rcp_approx_differ.npy"), bad.astype(np.uint32))
    path = os.path.join(os.environ.get("OUT", "."), "rcp_approx.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

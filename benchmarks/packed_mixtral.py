"""A random-weight model with Mixtral-8x7B's config, experts packed in MXFP4, evaluated by lm-eval on one GPU.

    python benchmarks/packed_mixtral.py --model /tmp/mixtral --out mixtral.json

The checkpoint (``python -m lm_eval_mx.hf.testing --preset mixtral-8x7b --stream``)
loads through ``from_pretrained`` with ``packed=True``: each expert tensor is
packed as it is read, so the bf16 model (93 GB) never exists. Records load time,
peak GPU memory, the packed-weight report and lm-eval's results.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager

from lm_eval_mx.hf.model import HFMXLM
from lm_eval_mx.hf.tasks import tasks_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--tasks", default="mx_corpus_ppl")
    p.add_argument("--limit", type=int, default=8)
    p.add_argument("--mx", default="w_format=fp4_e2m1,a_format=fp8_e4m3,roles=experts",
                   help="MX keys, as in --model_args")
    p.add_argument("--out", help="write the results here as JSON")
    ns = p.parse_args()
    mx = dict(kv.split("=", 1) for kv in ns.mx.split(","))
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    lm = HFMXLM(pretrained=ns.model, dtype="bfloat16", device="cuda:0", batch_size=1, packed=True, **mx)
    load_s = time.perf_counter() - t0
    after_load = torch.cuda.max_memory_allocated()
    t1 = time.perf_counter()
    res = simple_evaluate(model=lm, tasks=ns.tasks.split(","), limit=ns.limit,
                          task_manager=TaskManager(include_path=str(tasks_dir())))
    out = {
        "device": torch.cuda.get_device_name(),
        "gpu_total_bytes": torch.cuda.get_device_properties(0).total_memory,
        "load_s": round(load_s, 1),
        "eval_s": round(time.perf_counter() - t1, 1),
        "peak_bytes_after_load": after_load,
        "peak_bytes": torch.cuda.max_memory_allocated(),
        "memory_footprint_bytes": lm.model.get_memory_footprint(),
        "mx_label": lm.mx_config.label(),
        "mx_report": lm.mx_report.summary(),
        "results": res["results"] if res else None,
    }
    print(lm.mx_report.table())
    print(json.dumps(out, indent=1))
    if ns.out:
        with open(ns.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

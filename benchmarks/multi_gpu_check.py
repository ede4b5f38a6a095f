"""Compare the three runs of multi_gpu.sh: metrics, the MX config in each results file, time, memory.

    python benchmarks/multi_gpu_check.py OUT_DIR N_GPUS
"""

from __future__ import annotations

import csv
import json
import sys
from collections import defaultdict
from pathlib import Path


def results(out: Path, name: str) -> dict:
    files = sorted((out / name).rglob("results_*.json"))
    if len(files) != 1:
        raise SystemExit(f"{name}: expected one results file (rank 0 only), found {len(files)}")
    return json.loads(files[0].read_text())


def peak_mem(path: Path) -> dict[int, int]:
    peak: dict[int, int] = defaultdict(int)
    with path.open() as f:
        for row in csv.reader(f):
            if len(row) == 2 and row[0].strip().isdigit():
                peak[int(row[0])] = max(peak[int(row[0])], int(row[1]))
    return dict(peak)


def main() -> None:
    out, n = Path(sys.argv[1]), int(sys.argv[2])
    runs = {name: results(out, name) for name in ("one", "dp", "sharded")}
    times = dict(line.split() for line in (out / "times.txt").read_text().splitlines())
    ok = True
    base = runs["one"]["results"]
    print(f"{'run':<10}{'wall s':>10}  peak MiB per GPU   metrics equal to 1 GPU")
    for name, res in runs.items():
        cfg = res["config"]
        assert cfg["mx_config"]["roles"] == ["mlp_up", "mlp_down", "experts"], name
        diffs = {
            f"{t}/{k}": (v, res["results"][t].get(k))
            for t, entries in base.items() for k, v in entries.items()
            if isinstance(v, float) and res["results"][t].get(k) != v
        }
        nan = [k for t, e in res["results"].items() for k, v in e.items() if isinstance(v, float) and v != v]
        ok &= not nan and (name == "one" or not diffs)
        mem = peak_mem(out / f"mem_{name}.csv")
        print(f"{name:<10}{float(times[name]):>10.1f}  {mem}  {diffs or 'yes'}  {'NaN: ' + str(nan) if nan else ''}")
    print(f"{n} GPUs: {'PASS' if ok else 'FAIL'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

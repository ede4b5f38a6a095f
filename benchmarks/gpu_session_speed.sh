#!/usr/bin/env bash
# Issue 31's speed targets 1, 2, 3 and 5 on one H100/H200. Every step has its own timeout, capped by the time left
# of BUDGET (470 s; a step is skipped when < 30 s are left). The default steps' limits add up to 470 s: one device
# call of <= 8 minutes. The compiled (static cache) generation and batches 32/64 need a second call.
# Prepare here, in the repository root:
#   bash benchmarks/device_wheels.sh                                   # lm-eval's wheels -> .whl/
#   rm -rf .old_src && mkdir .old_src && git archive 45a35ba lm_eval_mx | tar -x -C .old_src   # the code before
#   grep -qx /.old_src/ "$(git rev-parse --git-path info)/exclude" || echo /.old_src/ >> "$(git rev-parse --git-path info)/exclude"
# then (the device copy has no .git: write the commit hash out)
#   run(command="COMMIT=<hash> bash benchmarks/gpu_session_speed.sh", carry=[".whl", ".old_src"])
#   run(command="COMMIT=<hash> STEPS='static1b static8b big' bash benchmarks/gpu_session_speed.sh", carry=[".whl"])
# Steps (STEPS chooses; default: tests host gen quant):
#   tests     tests/test_gpu.py without the torch-backend golden cases (the Triton ones, the property test, schemes,
#             rotations, models, torch.compile, packed kernels, the cached launcher) + tests/test_launch.py
#   host      host µs per MX activation call at decode size: new launcher / JITFunction.run / the old commit
#   gen       generate_until hf vs hf-mx MXFP8 (new launcher, and JITFunction.run), 1B and 8B shapes, batch 8, eager
#   quant     quantizer vs copy (MXFP8, MXFP4, NVFP4 both tile orders, rotated), NVFP4's maximum-pass sweep,
#             GPU µs per call at decode sizes per tile (CUDA graphs)
#   static1b, static8b   hf vs hf-mx MXFP8 with the static cache (transformers' compiled decode step), batch 8
#   big       eager, batch 32 and 64 (1B shape), then 8B batch 32
#   tiles     the flat kernel's tile sweep (MXFP8, MXFP4, MXFP4 + H32) on the three large shapes
# Outputs, flat, in $OUT: info.txt, test_gpu.txt, host.json, generate.json, quant.json, generate_static.json,
# generate_big.json, tiles.json; the console log is the device tool's output.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/speed_out}; mkdir -p "$OUT"
BUDGET=${BUDGET:-470}  # seconds for all steps
START=$SECONDS
exec 3>&1  # step footers: to the console, past the steps' filters
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD:$PWD/benchmarks PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo "${COMMIT:-unknown (pass COMMIT=)}")"
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  python3 -c "import xdist; print('xdist', xdist.__version__)" 2>/dev/null || echo "xdist: not installed (tests run in one process)"
} > "$OUT/info.txt" 2>&1
cat "$OUT/info.txt"
OLD=(); [ -d .old_src/lm_eval_mx ] && OLD=(--old .old_src)

step() {  # step NAME LIMIT COMMAND...: run with a timeout of min(LIMIT, time left); skipped when < 30 s are left
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - (SECONDS - START)))
  if [ $left -lt 30 ]; then echo "== $name: skipped ($left s left)" >&3; return; fi
  [ $limit -gt $left ] && limit=$left
  local t0=$SECONDS
  timeout --kill-after=10 $limit "$@"
  echo "== $name: rc=$? $((SECONDS - t0)) s (limit $limit s)" >&3
}

merge() {  # merge NAME: the part_*.json files of a step into NAME.json (keyed by part), parts removed
  python3 - "$OUT" "$1" <<'EOF'
import json, pathlib, sys
out, name = pathlib.Path(sys.argv[1]), sys.argv[2]
files = sorted(out.glob("part_*.json"))
old = json.loads((out / f"{name}.json").read_text()) if (out / f"{name}.json").exists() else {}
(out / f"{name}.json").write_text(json.dumps(old | {p.stem[5:]: json.loads(p.read_text()) for p in files}, indent=1))
for p in files:
    p.unlink()
EOF
}

MX8="hf-mx MXFP8 all projections"
SHOW='^ *"(hf|llama|seconds|ms_per|time_ratio)'
gen() {  # gen PART LIMIT ARGS...: one generate_bench run into part_PART.json
  local part=$1 limit=$2; shift 2
  step "$part" "$limit" python3 benchmarks/generate_bench.py --out "$OUT/part_$part.json" "$@" 2>&1 | grep -E "$SHOW" | tail -24
}
for s in ${STEPS:-tests host gen quant}; do
  case $s in
    tests)
      N=(); python3 -c "import xdist" 2>/dev/null && N=(-n 8)
      step tests 150 python3 -m pytest -q -p no:cacheprovider --maxfail=20 "${N[@]}" tests/test_gpu.py tests/test_launch.py \
        -k "not (test_golden_cuda and torch)" > "$OUT/test_gpu.txt" 2>&1
      tail -4 "$OUT/test_gpu.txt" ;;
    host) step host 50 python3 benchmarks/host_profile.py --only percall "${OLD[@]}" --out "$OUT/host.json" 2>&1 | tail -30 ;;
    gen) gen eager_llama-3.2-1b 70 --preset llama-3.2-1b --variants "$MX8" "$MX8, JITFunction.run launches" --requests 8 --passes 3
         gen eager_llama-3.1-8b 110 --preset llama-3.1-8b --variants "$MX8" "$MX8, JITFunction.run launches" --requests 8 --passes 3
         merge generate ;;
    quant) step quant 90 python3 benchmarks/gpu_bench.py --only quant amax decode --reps 20 --out "$OUT/quant.json" 2>&1 | tail -20 ;;
    static1b|static8b)
      preset=$([ $s = static1b ] && echo llama-3.2-1b || echo llama-3.1-8b)
      gen "static_$preset" 150 --static --preset $preset --variants "$MX8" --requests 8 --passes 3
      merge generate_static ;;
    big) for b in 32 64; do gen "b${b}_llama-3.2-1b" 80 --preset llama-3.2-1b --variants "$MX8" --batch_size $b --requests $b --passes 2; done
         gen b32_llama-3.1-8b 90 --preset llama-3.1-8b --variants "$MX8" --batch_size 32 --requests 32 --passes 2
         merge generate_big ;;
    tiles) step tiles 120 python3 benchmarks/gpu_bench.py --only tiles --reps 15 --out "$OUT/tiles.json" 2>&1 | tail -10 ;;
  esac
done
echo "total: $((SECONDS - START)) s"

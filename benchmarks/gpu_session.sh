#!/usr/bin/env bash
# Every GPU measurement of one session in ONE device call (device time is scarce: a machine's start costs minutes).
# Each step has its own timeout, capped by what is left of BUDGET seconds; a step with < 20 s left is skipped.
# Prepare here, in the repository root:
#   bash benchmarks/device_wheels.sh                                                 # lm-eval's wheels -> .whl/
#   rm -rf .old_src && mkdir .old_src && git archive 45a35ba lm_eval_mx | tar -x -C .old_src   # code before #31
# then: run(command="COMMIT=$(git rev-parse HEAD) bash benchmarks/gpu_session.sh", carry=[".whl", ".old_src"])
# Steps (STEPS chooses):
#   tests   tests/test_gpu.py in full (golden cases on both backends, Triton == torch property test, cached launcher,
#           packed kernels, models) + the CUDA tests of the checkpoint readers and the launcher
#   host    host µs per MX activation call at decode size: cached launcher / JITFunction.run / the code before (#31)
#   quant   quantizer vs a device copy (MXFP8, MXFP4, NVFP4, rotated), all variants in turns in one process
#   gen     generate_until hf vs hf-mx MXFP8 on every projection, Llama-3.2-1B shape, batch 8, eager
#   gptq    GPTQ of Llama-3.1-8B-shaped blocks (MXFP4, NVFP4; per-block times, extrapolation to 32 and to 70B)
#   gptoss  a gpt-oss-120b-shaped MXFP4 checkpoint (random codes) loaded straight to the GPU and evaluated
#   rcp     PTX rcp.approx.ftz.f32 vs the correctly rounded reciprocal (the vllm-blackwell profile's assumption)
# Outputs, flat in $OUT (8 files at most): info.txt test_gpu.txt host.json quant.json generate.json gptq_gpu.json
# gptoss_120b.json rcp_approx.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_session}; mkdir -p "$OUT"
BUDGET=${BUDGET:-480}
START=$SECONDS
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD:$PWD/benchmarks PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  echo "commit: ${COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  df -h /tmp | tail -1
} > "$OUT/info.txt" 2>&1
cat "$OUT/info.txt"
OLD=(); [ -d .old_src/lm_eval_mx ] && OLD=(--old .old_src)

step() {  # step NAME LIMIT COMMAND...
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - (SECONDS - START)))
  if [ $left -lt 20 ]; then echo "== $name: skipped ($left s left)"; return; fi
  [ $limit -gt $left ] && limit=$left
  local t0=$SECONDS
  timeout --kill-after=5 $limit "$@"
  echo "== $name: rc=$? $((SECONDS - t0)) s (limit $limit s)"
}
for s in ${STEPS:-tests host quant gen gptq gptoss rcp}; do
  case $s in
    tests) step tests 170 python3 -m pytest -q -p no:cacheprovider --maxfail=20 -n 8 tests/test_gpu.py tests/test_launch.py \
             tests/test_gptoss.py tests/test_shipped_moe.py > "$OUT/test_gpu.txt" 2>&1; tail -6 "$OUT/test_gpu.txt" ;;
    host) step host 40 python3 benchmarks/host_profile.py --only percall "${OLD[@]}" --out "$OUT/host.json" 2>&1 | tail -20 ;;
    quant) step quant 60 python3 benchmarks/gpu_bench.py --only quant --reps 20 --out "$OUT/quant.json" 2>&1 | tail -20 ;;
    gen) step gen 70 python3 benchmarks/generate_bench.py --preset llama-3.2-1b --requests 8 --passes 2 \
           --variants "hf-mx MXFP8 all projections" "hf-mx MXFP8 all projections, JITFunction.run launches" \
           --out "$OUT/generate.json" 2>&1 | grep -E '^ *"(hf|llama|seconds|ms_per|time_ratio)' | tail -20 ;;
    gptq) step gptq 70 python3 benchmarks/gptq_gpu.py --layers 2 --layers70 0 --variants mxfp4 nvfp4 --budget 50 \
            --variant_timeout 30 --out "$OUT/gptq_gpu.json" 2>&1 | tail -15 ;;
    gptoss) step gptoss 60 python3 benchmarks/gptoss_load.py --shape 120b --layers 3 --dir /tmp \
              --out "$OUT/gptoss_120b.json" 2>&1 | tail -25 ;;
    rcp) step rcp 20 python3 benchmarks/rcp_approx_probe.py 2>&1 | tail -5 ;;
  esac
done
echo "total: $((SECONDS - START)) s"

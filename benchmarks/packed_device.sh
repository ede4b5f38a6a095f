#!/usr/bin/env bash
# Packed MX weights on one GPU (issue: packed weights), in one device call:
#   1. tests/test_gpu.py (golden cases, the packed GEMM's exact decode and stated tolerance, packed models);
#   2. benchmarks/packed_bench.py: weight memory and MLP/GEMM speed, Llama-3.1-8B shapes, loaded from disk;
#   tiles. (only when named) the decode kernel's tile sweep against copy and write-only bandwidth;
#   3. a random Mixtral-8x7B (written tensor by tensor in float8 to fit the 64 GB disk), experts packed
#      in MXFP4 while loading, evaluated by lm-eval (benchmarks/packed_mixtral.py).
# Prepare here with `bash benchmarks/device_wheels.sh`, then
#   run(command="bash benchmarks/packed_device.sh", carry=[".whl"])        # STEPS="1 2 3" by default
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
OUT=${OUT:-/tmp/packed_out}; mkdir -p "$OUT"
STEPS=${STEPS:-1 2 3}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; df -h /tmp | tail -1
for step in $STEPS; do case $step in
  1) python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py ${PYTEST_K:+-k "$PYTEST_K"} > "$OUT/test_gpu.txt" 2>&1 \
       || { tail -60 "$OUT/test_gpu.txt"; exit 1; }
     tail -3 "$OUT/test_gpu.txt" ;;
  2) python3 benchmarks/packed_bench.py --reps "${REPS:-30}" --out "$OUT/packed_bench.json" > "$OUT/packed_bench.log" 2>&1 \
       || { tail -30 "$OUT/packed_bench.log"; exit 1; }
     tail -60 "$OUT/packed_bench.log" ;;
  tiles) python3 benchmarks/packed_bench.py --dequant-tiles --reps 30 > "$OUT/dequant_tiles.txt" 2>&1 \
       || { tail -30 "$OUT/dequant_tiles.txt"; exit 1; }
     cat "$OUT/dequant_tiles.txt" ;;
  3) M=/tmp/mixtral-8x7b
     t0=$SECONDS
     python3 -m lm_eval_mx.hf.testing --preset mixtral-8x7b --out $M --stream --dtype float8_e4m3fn --device cuda
     echo "checkpoint written in $((SECONDS - t0)) s: $(du -sh $M | cut -f1)"; df -h /tmp | tail -1
     python3 benchmarks/packed_mixtral.py --model $M --out "$OUT/packed_mixtral.json" > "$OUT/packed_mixtral.log" 2>&1 \
       || { tail -40 "$OUT/packed_mixtral.log"; exit 1; }
     tail -45 "$OUT/packed_mixtral.log" ;;
esac; done

#!/usr/bin/env bash
# Everything measured on a lent GPU, in one device call (the steps you name):
#   tests     tests/test_gpu.py (PYTEST_N=8: xdist workers; golden cases on both backends, Triton == torch property test, schemes, rotations,
#             packed weights, whole models)
#   quant     activation quantizer vs a device copy (MXFP8, MXFP4, NVFP4, rotated)   } benchmarks/gpu_bench.py
#   tiles     the flat kernel's tile/warps sweep                                     }
#   host      host microseconds per MX call at decode size                           }
#   mlp       Llama-3.1-8B LlamaMLP via apply_mx vs bf16 and a bf16 control          }
#   generate  generate_until, hf-mx vs hf (Llama-3.2-1B and 3.1-8B shapes)           benchmarks/generate_bench.py
#   loglik    loglikelihood_rolling, hf-mx vs hf (Llama-3.2-1B shapes)               benchmarks/e2e_throughput.py
#   packed    packed weights (incl. NVFP4): memory and MLP speed                     benchmarks/packed_bench.py
#   search    lm-eval-mx search on a Llama-3.2-1B-shaped model                       benchmarks/search_bench.py
#   profile   host time of the quantizer and of decode steps (cProfile, torch.profiler) benchmarks/host_profile.py
# Prepare here with `bash benchmarks/device_wheels.sh`, then
#   run(command="STEPS='tests quant' bash benchmarks/device_run.sh", carry=[".whl"])
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD:$PWD/benchmarks PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
OUT=${OUT:-/tmp/device_out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
status=0
for step in ${STEPS:-tests quant tiles host mlp generate loglik packed}; do
  t0=$SECONDS
  case $step in
    tests) python3 -m pytest -q -p no:cacheprovider --maxfail=20 tests/test_gpu.py ${PYTEST_N:+-n $PYTEST_N} ${PYTEST_K:+-k "$PYTEST_K"} > "$OUT/test_gpu.txt" 2>&1
           rc=$?; tail -15 "$OUT/test_gpu.txt" | grep -v "^\.*$"; [ $rc -eq 0 ] || status=1 ;;
    quant|tiles|host|mlp) python3 benchmarks/gpu_bench.py --only $step --out "$OUT/gpu_bench_$step.json" 2>&1 | tail -25 ;;
    generate) python3 benchmarks/generate_bench.py --preset ${GEN_PRESETS:-llama-3.2-1b llama-3.1-8b} --requests 16 --passes 2 --out "$OUT/generate.json" 2>&1 \
                | grep -v "^ *\[\|^ *[0-9.]*,\?$\|^ *\]" | tail -45 ;;
    loglik) python3 benchmarks/e2e_throughput.py --preset llama-3.2-1b --docs 32 --tokens 2048 --batch_size 8 \
              --out "$OUT/loglik.json" 2>&1 | tail -25 ;;
    packed) python3 benchmarks/packed_bench.py --tokens 2048 8192 --reps 20 --out "$OUT/packed.json" > "$OUT/packed.log" 2>&1
            grep -E "ratio|bytes|NVFP4|error" "$OUT/packed.log" | head -40 ;;
    search) python3 benchmarks/search_bench.py --out "$OUT/search.json" 2>&1 | tail -25 ;;
    profile) python3 benchmarks/host_profile.py > "$OUT/host_profile.txt" 2>&1; grep -E "tottime|triton_mx.py|backends.py|jit.py|driver|launch|Self CPU|aten::|triton|mx" "$OUT/host_profile.txt" | head -40 ;;
  esac
  echo "== $step: $((SECONDS - t0)) s"
done
exit $status

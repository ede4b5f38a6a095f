#!/usr/bin/env bash
# Multi-GPU hf-mx on a random-weight model with Llama-3.1-8B's shapes (no download):
#   1. 1 GPU vs `accelerate launch` data parallel on all N GPUs, same batch size: same metrics?
#   2. parallelize=True (one model sharded over the GPUs): same metrics as 1 GPU, no NaN?
#   3. wall time and peak per-GPU memory of each.
# Prepare here with `bash benchmarks/device_wheels.sh`, then on a multi-GPU device kind:
#   run(command="bash benchmarks/multi_gpu.sh", carry=[".whl"], kind="nvidia-h200-x2|x4|x8")
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/multi_gpu_out}
MODEL=${MODEL:-/tmp/llama8b}
TASKS=${TASKS:-mx_corpus_ppl}
BATCH=${BATCH:-4}
N=$(python3 -c "import torch; print(torch.cuda.device_count())")
rm -f "$OUT/times.txt"; mkdir -p "$OUT"
[ -d "$MODEL" ] || python3 -m lm_eval_mx.hf.testing --preset llama-3.1-8b --out "$MODEL"
MX="pretrained=$MODEL,dtype=bfloat16,mlp_only=True"
COMMON=(--model hf-mx --tasks "$TASKS" --batch_size "$BATCH")

run() {  # name, then the command; samples per-GPU memory while it runs
  local name=$1; shift
  nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 500 > "$OUT/mem_$name.csv" &
  local smi=$!
  local t0=$SECONDS
  "$@" --output_path "$OUT/$name" > "$OUT/log_$name.txt" 2>&1 || { kill $smi; tail -40 "$OUT/log_$name.txt"; exit 1; }
  echo "$name $((SECONDS - t0))" >> "$OUT/times.txt"
  kill $smi
}

run one python3 -m lm_eval_mx.commands.cli run "${COMMON[@]}" --model_args "$MX" --device cuda:0
MULTI=$([ "$N" -gt 1 ] && echo --multi_gpu || true)
run dp accelerate launch $MULTI --num_processes "$N" --num_machines 1 --mixed_precision no --dynamo_backend no \
  -m lm_eval_mx.commands.cli run "${COMMON[@]}" --model_args "$MX"
run sharded python3 -m lm_eval_mx.commands.cli run "${COMMON[@]}" --model_args "$MX,parallelize=True"
python3 benchmarks/multi_gpu_check.py "$OUT" "$N"

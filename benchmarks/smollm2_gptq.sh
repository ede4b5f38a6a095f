#!/usr/bin/env bash
# The README's "baseline vs RTN vs GPTQ vs MR-GPTQ" table on SmolLM2-135M (the demo's model), on CPU:
# four GPTQ checkpoints (MXFP4 and NVFP4, W4A4, with and without the block Hadamard; one thread each, up to
# $JOBS at a time), then one compare run with RTN as --config columns and the checkpoints as --checkpoint
# columns. Logs and outputs in $OUT; checkpoints in $CK (kept when they exist: SKIP_DONE=1).
set -euo pipefail
OUT=${OUT:-benchmarks/results/smollm2_gptq}
CK=${CK:-/tmp/smollm2_ckpt}
JOBS=${JOBS:-2}
LIMIT=${LIMIT:-100}
TASKS=${TASKS:-piqa_offline,mx_corpus_ppl}
MODEL="pretrained=$(python -c "from lm_eval_mx.commands.demo import smollm2_dir; print(smollm2_dir())"),gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf,dtype=float32"
CAL=(--calibration hellaswag_offline --nsamples 32 --seqlen 256 --seed 0)
mkdir -p "$OUT" "$CK"
quantize() {  # $1 format, $2 rotation
  local name=$1-gptq$([ "$2" = hadamard ] && echo -had || true)
  if [ "${SKIP_DONE:-0}" = 1 ] && [ -f "$CK/$name/mx_quantize.json" ]; then return; fi
  OMP_NUM_THREADS=1 /usr/bin/time -v lm-eval-mx quantize --model_args "$MODEL,format=$1,rotation=$2" --method gptq \
    "${CAL[@]}" --device cpu --output "$CK/$name" --overwrite > "$OUT/quantize_$name.log" 2>&1
  cp "$CK/$name/mx_quantize.json" "$OUT/mx_quantize_$name.json"
}
for fmt in mxfp4 nvfp4; do
  for rot in none hadamard; do
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 5; done
    quantize "$fmt" "$rot" &
  done
done
wait
/usr/bin/time -v lm-eval-mx compare --model_args "$MODEL" --tasks "$TASKS" \
  --limit "$LIMIT" --batch_size 16 --device cpu --output_dir "$OUT/compare" \
  --config format=mxfp4 --config format=mxfp4,rotation=hadamard \
  --checkpoint "mxfp4 gptq=$CK/mxfp4-gptq" --checkpoint "mxfp4 mr-gptq=$CK/mxfp4-gptq-had" \
  --config format=nvfp4 --config format=nvfp4,rotation=hadamard \
  --checkpoint "nvfp4 gptq=$CK/nvfp4-gptq" --checkpoint "nvfp4 mr-gptq=$CK/nvfp4-gptq-had" > "$OUT/compare.log" 2>&1

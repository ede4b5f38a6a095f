#!/usr/bin/env bash
# The README's "baseline vs RTN vs GPTQ vs MR-GPTQ" table on SmolLM2-135M (the demo's model), on CPU:
# four GPTQ checkpoints (MXFP4 and NVFP4, W4A4, with and without the block Hadamard), then one compare run
# with RTN as --config columns and the checkpoints as --checkpoint columns. Logs and outputs in $OUT.
set -euo pipefail
OUT=${OUT:-benchmarks/results/smollm2_gptq}
CK=${CK:-/tmp/smollm2_ckpt}
MODEL="pretrained=$(python -c "from lm_eval_mx.commands.demo import smollm2_dir; print(smollm2_dir())"),gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf,dtype=float32"
CAL=(--calibration hellaswag_offline --nsamples 32 --seqlen 256 --seed 0)
mkdir -p "$OUT" "$CK"
for fmt in mxfp4 nvfp4; do
  for rot in none hadamard; do
    name=$fmt-gptq$([ $rot = hadamard ] && echo -had || true)
    /usr/bin/time -v lm-eval-mx quantize --model_args "$MODEL,format=$fmt,rotation=$rot" --method gptq "${CAL[@]}" \
      --device cpu --output "$CK/$name" --overwrite > "$OUT/quantize_$name.log" 2>&1
    cp "$CK/$name/mx_quantize.json" "$OUT/mx_quantize_$name.json"
  done
done
/usr/bin/time -v lm-eval-mx compare --model_args "$MODEL" --tasks arc_easy_offline,piqa_offline,mx_corpus_ppl \
  --limit 150 --batch_size 16 --device cpu --output_dir "$OUT/compare" \
  --config format=mxfp4 --config format=mxfp4,rotation=hadamard \
  --checkpoint "mxfp4 gptq=$CK/mxfp4-gptq" --checkpoint "mxfp4 mr-gptq=$CK/mxfp4-gptq-had" \
  --config format=nvfp4 --config format=nvfp4,rotation=hadamard \
  --checkpoint "nvfp4 gptq=$CK/nvfp4-gptq" --checkpoint "nvfp4 mr-gptq=$CK/nvfp4-gptq-had" > "$OUT/compare.log" 2>&1

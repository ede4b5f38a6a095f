"""Tiny randomly initialised models of every seed architecture, built from configs (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)


def tiny_config(arch: str):
    import transformers as tf

    if arch == "gpt_neo":
        return tf.GPTNeoConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96,
                               attention_types=[[["global", "local"], 1]], vocab_size=128,
                               max_position_embeddings=64, window_size=16, bos_token_id=0, eos_token_id=0)
    if arch == "qwen2":
        return tf.Qwen2Config(**_TINY)
    if arch == "phi":
        return tf.PhiConfig(**_TINY)
    if arch == "llama":
        return tf.LlamaConfig(**_TINY)
    if arch == "phi3":
        return tf.Phi3Config(**_TINY, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "mixtral":
        return tf.MixtralConfig(**_TINY, num_local_experts=4, num_experts_per_tok=2)
    if arch == "mpt":
        return tf.MptConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=128, max_seq_len=64, expansion_ratio=2)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                             bos_token_id=0, eos_token_id=0)
    # architectures no issue names, for the general case
    if arch == "opt":
        return tf.OPTConfig(hidden_size=64, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                            word_embed_proj_dim=64, max_position_embeddings=64)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(**{k: v for k, v in _TINY.items() if k != "num_key_value_heads"})
    if arch == "falcon":
        return tf.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128)
    if arch == "bloom":
        return tf.BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=128)
    if arch == "gptj":
        return tf.GPTJConfig(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64, rotary_dim=8)
    if arch == "qwen2_moe":
        return tf.Qwen2MoeConfig(**_TINY, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                                 num_experts=4, num_experts_per_tok=2)
    if arch == "olmoe":
        return tf.OlmoeConfig(**_TINY, num_experts=4, num_experts_per_tok=2)
    if arch == "gemma":
        return tf.GemmaConfig(**_TINY, head_dim=16)
    raise KeyError(arch)


ARCHS = ["gpt_neo", "qwen2", "phi", "llama", "phi3", "mixtral", "mpt", "gpt2"]
MORE_ARCHS = ["opt", "gpt_neox", "falcon", "bloom", "gptj", "qwen2_moe", "olmoe", "gemma"]


def tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    from lm_eval_mx.hf.testing import randomize_

    torch.manual_seed(seed)  # HF init of the vectors (biases, norms) draws from the global generator
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=dtype)
    return randomize_(model, 0.2, seed).eval()


@pytest.fixture
def one_thread():
    """Tiny tensors gain nothing from threads, and on a busy machine each op waits for them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


def save_tiny(path, arch: str = "llama", seed: int = 0) -> str:
    """Save a tiny random model of ``arch`` with a locally trained tokenizer to ``path``."""
    from lm_eval_mx.hf.testing import save_random_model

    return save_random_model(path, tiny_config(arch), seed=seed)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> str:
    return save_tiny(tmp_path_factory.mktemp("tiny_llama"))

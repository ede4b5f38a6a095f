"""Load a gpt-oss-shaped MXFP4 checkpoint with hf-mx straight to the GPU and evaluate it: peak GPU memory, peak
host RSS, load time (a measurement).

A checkpoint with gpt-oss-120b's (or -20b's) public config shapes is written to local disk with random codes
(experts ``*_blocks`` random bytes, ``*_scales`` E8M0 exponents 119..122, everything else bf16 random normal; one
safetensors shard per layer), in a child process so that its host memory does not count. Then, in this process,
``HFMXLM(pretrained=DIR, device=cuda)`` loads it (every tensor read and moved to the GPU as it is read; experts kept
as stored, packed) and a few loglikelihood requests are evaluated. Reported: peak ``torch.cuda.max_memory_allocated``
(load, then evaluation), peak host RSS of this process (``ru_maxrss``) and its RSS before loading, load and
evaluation wall times, the checkpoint's bytes.

If the disk cannot hold the whole checkpoint (120b: ~65 GB), fewer layers are written and loaded, and the output
says so and extrapolates the GPU memory linearly per layer (measured peak + missing layers x the bytes one layer
holds on the GPU, computed from its tensors' sizes); host RSS does not grow with layers (one tensor at a time).

    python benchmarks/gptoss_load.py --shape 20b --out $OUT/gptoss_20b.json
    python benchmarks/gptoss_load.py --shape 120b --out $OUT/gptoss_120b.json
    python benchmarks/gptoss_load.py --tiny            # CPU smoke run of the same path
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import torch

# Public gpt-oss configs (openai/gpt-oss-20b and -120b config.json); "tiny" keeps the structure at toy size.
SHAPES = {
    "120b": dict(num_hidden_layers=36, num_local_experts=128, vocab_size=201088, hidden_size=2880,
                 intermediate_size=2880, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
                 num_experts_per_tok=4, sliding_window=128),
    "20b": dict(num_hidden_layers=24, num_local_experts=32, vocab_size=201088, hidden_size=2880,
                intermediate_size=2880, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
                num_experts_per_tok=4, sliding_window=128),
    "tiny": dict(num_hidden_layers=2, num_local_experts=4, vocab_size=64, hidden_size=64, intermediate_size=64,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts_per_tok=2,
                 sliding_window=8),
}
NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]


def config(shape: dict, layers: int):
    from transformers import GptOssConfig

    cfg = GptOssConfig(**{**shape, "num_hidden_layers": layers},
                       layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
                       max_position_embeddings=131072, tie_word_embeddings=False, pad_token_id=0, eos_token_id=0)
    cfg.quantization_config = {"quant_method": "mxfp4", "modules_to_not_convert": NOT_CONVERTED}
    cfg.dtype = "bfloat16"
    return cfg


def layer_tensors(cfg, i: int, gen: torch.Generator, device: str) -> dict[str, torch.Tensor]:
    """Layer ``i``'s stored tensors as gpt-oss stores them (random values)."""
    h, inter, e, d = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    p = f"model.layers.{i}."

    def normal(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(shape, generator=gen, device=device) * std).to(torch.bfloat16).cpu()

    def codes(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = torch.randint(0, 256, (e, n, k // 32, 16), generator=gen, device=device, dtype=torch.uint8)
        scales = torch.randint(119, 123, (e, n, k // 32), generator=gen, device=device, dtype=torch.uint8)
        return blocks.cpu(), scales.cpu()

    gu_b, gu_s = codes(2 * inter, h)
    d_b, d_s = codes(h, inter)
    return {
        p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
        p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
        p + "self_attn.q_proj.weight": normal(q, h), p + "self_attn.q_proj.bias": normal(q),
        p + "self_attn.k_proj.weight": normal(kv, h), p + "self_attn.k_proj.bias": normal(kv),
        p + "self_attn.v_proj.weight": normal(kv, h), p + "self_attn.v_proj.bias": normal(kv),
        p + "self_attn.o_proj.weight": normal(h, q), p + "self_attn.o_proj.bias": normal(h),
        p + "self_attn.sinks": normal(cfg.num_attention_heads, std=1.0),
        p + "mlp.router.weight": normal(e, h), p + "mlp.router.bias": normal(e),
        p + "mlp.experts.gate_up_proj_blocks": gu_b, p + "mlp.experts.gate_up_proj_scales": gu_s,
        p + "mlp.experts.gate_up_proj_bias": normal(e, 2 * inter),
        p + "mlp.experts.down_proj_blocks": d_b, p + "mlp.experts.down_proj_scales": d_s,
        p + "mlp.experts.down_proj_bias": normal(e, h),
    }


def layer_bytes(cfg) -> int:
    """Bytes one layer's stored tensors take (as stored and as held on the GPU: codes, scales, bf16)."""
    h, inter, e, d = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    experts = e * (2 * inter * h // 2 + 2 * inter * h // 32 + h * inter // 2 + h * inter // 32)
    bf16 = 2 * (2 * h + 2 * q * h + 2 * kv * h + q + 2 * kv + h + cfg.num_attention_heads + e * h + e
                + e * 2 * inter + e * h)
    return experts + bf16


def write(path: str, shape: str, layers: int, device: str) -> None:
    """The checkpoint (runs in a child process): one shard per layer plus one for embeddings, norm and lm_head."""
    from safetensors.torch import save_file

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data"))
    from make_moe_fixtures import tokenizer

    cfg = config(SHAPES[shape], layers)
    cfg.save_pretrained(path)
    tokenizer().save_pretrained(path)
    gen = torch.Generator(device=device).manual_seed(0)
    weight_map = {}
    for i in range(layers):
        name = f"model-{i:05d}.safetensors"
        tensors = layer_tensors(cfg, i, gen, device)
        save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    rest = {"model.embed_tokens.weight": (torch.randn(cfg.vocab_size, cfg.hidden_size, generator=gen, device=device)
                                          * 0.02).to(torch.bfloat16).cpu(),
            "lm_head.weight": (torch.randn(cfg.vocab_size, cfg.hidden_size, generator=gen, device=device)
                               * 0.02).to(torch.bfloat16).cpu(),
            "model.norm.weight": torch.ones(cfg.hidden_size, dtype=torch.bfloat16)}
    save_file(rest, os.path.join(path, "model-rest.safetensors"), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(rest, "model-rest.safetensors"))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def evaluate(path: str, device: str) -> dict:
    from lm_eval.api.instance import Instance

    from lm_eval_mx.hf.model import HFMXLM

    cuda = device.startswith("cuda")
    rss_before = rss_mib()
    t0 = time.perf_counter()
    lm = HFMXLM(pretrained=path, device=device, dtype="bfloat16", batch_size=1)
    if cuda:
        torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    load_gpu = torch.cuda.max_memory_allocated() if cuda else None
    peak_rss_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    words = [f"t{i}" for i in range(2, 60)]
    requests = [Instance("loglikelihood", {}, (" ".join(words[i:i + 12]), " " + words[i + 12]), i) for i in range(4)]
    t0 = time.perf_counter()
    results = lm.loglikelihood(requests, disable_tqdm=True)
    eval_s = time.perf_counter() - t0
    held = {n: str(p.device) for n, p in lm.model.named_parameters()}
    return {"load_s": round(load_s, 2), "eval_s": round(eval_s, 2), "loglikelihoods": [r[0] for r in results],
            "peak_gpu_bytes_after_load": load_gpu,
            "peak_gpu_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            "rss_mib_before_load": round(rss_before, 1), "peak_rss_mib_load": round(peak_rss_load, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "param_devices": sorted(set(held.values())),
            "experts_dtype": str(lm.model.model.layers[0].mlp.experts.gate_up_proj.dtype)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["20b", "120b"], default="20b")
    p.add_argument("--tiny", action="store_true", help="toy shape on CPU (smoke test of the same path)")
    p.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temporary directory)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--layers", type=int, default=None,
                   help="write and load only this many layers (to fit a time limit); the GPU memory of the rest is "
                        "extrapolated per layer, as when the disk is short")
    ns = p.parse_args()
    shape = "tiny" if ns.tiny else ns.shape
    device = "cpu" if ns.tiny else "cuda"
    full = config(SHAPES[shape], SHAPES[shape]["num_hidden_layers"])
    per_layer = layer_bytes(full)
    rest = 2 * 2 * full.vocab_size * full.hidden_size
    root = ns.dir or tempfile.mkdtemp(prefix="gptoss_")
    free = shutil.disk_usage(root).free
    layers = full.num_hidden_layers
    if per_layer * layers + rest > free - (2 << 30):
        layers = max(1, int((free - (2 << 30) - rest) // per_layer))
    if ns.layers is not None:
        layers = max(1, min(layers, ns.layers))
    path = os.path.join(root, f"gptoss-{shape}")
    t0 = time.perf_counter()
    ctx = mp.get_context("spawn")
    child = ctx.Process(target=write, args=(path, shape, layers, device))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise SystemExit(f"writing the checkpoint failed (exit {child.exitcode})")
    write_s = time.perf_counter() - t0
    out = {"shape": shape, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
           "commit": _commit(), "torch": torch.__version__, "layers_written": layers,
           "layers_in_config": full.num_hidden_layers, "checkpoint_bytes": _bytes(path), "write_s": round(write_s, 1),
           "disk_free_bytes": free, **evaluate(path, device)}
    if layers < full.num_hidden_layers and device == "cuda":
        out["extrapolated"] = {
            "why": (f"--layers {ns.layers}" if ns.layers is not None and layers == ns.layers else
                    f"disk holds {free / 2**30:.1f} GiB") + f": {layers} of {full.num_hidden_layers} layers written",
            "per_layer_bytes": per_layer,
            "peak_gpu_bytes_full": out["peak_gpu_bytes"] + (full.num_hidden_layers - layers) * per_layer}
    shutil.rmtree(path, ignore_errors=True)
    text = json.dumps(out, indent=1)
    print(text)
    if ns.out:
        with open(ns.out, "w") as f:
            f.write(text)


def _bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("COMMIT")


if __name__ == "__main__":
    main()

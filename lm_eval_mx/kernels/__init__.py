"""Layer 2, kernels: the same numerics computed faster (Triton on CUDA), and the choice of engine.

``triton_mx`` holds the kernels (bit-identical to :mod:`lm_eval_mx.numerics.quantize`), ``backends`` picks an engine
per tensor. May import: numerics.
"""

from __future__ import annotations

# Quantization engines (lm_eval_mx.kernels.backends); all give bit-identical results. Here, torch-free, so that
# configuration can be checked before anything heavy is imported.
BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")

"""Layer 1, numerics: what a quantized tensor's values are, to the bit.

Element formats, schemes and their tables (``formats``, plain Python: no torch), the exact torch
reference quantizer (``quantize``), block Hadamard rotations (``rotation``), packed storage
(``packing``) and the packed layouts other tools' checkpoints store (``layouts``, one codec module per
format). Tensors in, tensors out: nothing here knows of ``nn.Module``, transformers or lm-eval.
May import: torch. Nothing else of this package.
"""

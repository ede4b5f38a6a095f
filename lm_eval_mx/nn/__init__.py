"""Layer 3, nn: modules that compute in MX.

``spec`` (a layer's resolved schemes, rotation and engine), ``layers`` (MX subclasses of ``nn.Linear``,
GPT-2 ``Conv1D`` and fused experts, fake-quantized or packed) and ``attention`` (the MX attention matmuls,
registered with transformers' ``AttentionInterface``). May import: kernels, numerics.
"""

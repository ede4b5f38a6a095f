"""Layer 5, hf: transformers and lm-eval integration.

``model`` (the ``hf-mx`` lm-eval model, a thin layer over ``HFLM``), ``quantizer`` (packed weights through
transformers' quantizer API; saved packed checkpoints), ``shipped`` (other tools' NVFP4/MXFP4 checkpoints, loaded
with their weights as stored), ``tasks`` (where the offline tasks live) and ``testing`` (random models of real
architectures, for tests and device runs). May import: selection and everything below it.
"""

"""Layer 5, hf: transformers and lm-eval integration.

``model`` (the ``hf-mx`` lm-eval model, a thin layer over ``HFLM``), ``quantizer`` (packed weights through
transformers' quantizer API), ``checkpoints`` (checkpoints of other tools read as stored, one reader module per
format), ``tasks`` (where the offline tasks live) and ``testing`` (random models of real
architectures, for tests and device runs). May import: selection and everything below it.
"""

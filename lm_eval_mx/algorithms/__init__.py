"""Layer 6, algorithms: measurements and searches over a model with MX layers.

``corpus`` (text to token batches), ``divergence`` (KL, agreement, SQNR, per-unit sensitivity) and
``search`` (measure each unit's KL per format, solve an exact knapsack, read and write recipes), ``gptq``
(GPTQ / MR-GPTQ rounding), ``calibration`` (calibration token windows from files or a task) and
``quantize_model`` (RTN/GPTQ over a model's selected layers, saved as a packed MX checkpoint).
May import: hf and everything below it; never the commands.
"""

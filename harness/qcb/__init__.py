"""Floor 7 — the quantization-conditioned backdoor: an attack that sleeps in FP32 and wakes in the
deployed INT8/INT4 file (fake-quant training, re-quantization checks and its experiment pipeline).
"""

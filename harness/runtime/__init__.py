"""Floor 3 — the deployed model at run time: the onnxruntime adapter every defense talks to
(logits, activations, channel masks, gradient oracle), INT8 kernel profiles, untrusted-file
loading and output sanity checks.
"""

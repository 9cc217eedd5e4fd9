"""Floor 2 — a differentiable torch copy of a deployed ONNX graph (the gradient oracle's engine):
the interpreter, onnxruntime's integer arithmetic (shared with the QCB fake-quant mirror), one
module of converters per op family and build-time rewrites that keep every value and gradient
bit-identical. Knows nothing of onnxruntime sessions; :mod:`harness.runtime.oracle`
decides, by a parity check against the shipped session, whether its gradients may be used.
"""

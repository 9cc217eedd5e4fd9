"""Floor 1 — a model file as data: preprocessing metadata, sidecars, graph edits (probe outputs,
channel masks), graph inputs and the intake that turns a vendor file into the harness contract.

Reads and writes ONNX protos with ``onnx``; never starts onnxruntime or torch.
"""

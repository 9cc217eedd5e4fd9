"""Floor 0 — plumbing every other floor stands on: errors, registries, atomic writes, run locks,
seeded sampling, progress lines, float-kernel pins, scoped thread counts, metrics and verdict
words.

Imports nothing heavier than numpy and pydantic (no torch, onnx or onnxruntime), so anything may
import it cheaply; ``.importlinter`` enforces that.
"""

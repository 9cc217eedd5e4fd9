"""Benchmarks of the pipeline floor; run each as ``python -m bench.pipeline.<name>``."""

"""Benchmarks of the runtime floor; run each as ``python -m bench.runtime.<name>``."""

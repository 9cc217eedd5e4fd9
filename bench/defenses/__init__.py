"""Benchmarks of the defenses floor; run each as ``python -m bench.defenses.<name>``."""

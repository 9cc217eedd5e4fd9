"""Benchmarks of the qcb floor; run each as ``python -m bench.qcb.<name>``."""

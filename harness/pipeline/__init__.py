"""Floor 5 — experiments: configs, preparing artifacts, evaluating cells, the runner, repair
retraining, the result store, sweeps and their executors. Stands on defenses and exporters.
"""

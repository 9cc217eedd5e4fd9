"""Floor 3 — training the project's own classifiers: architectures and the seeded training loop."""

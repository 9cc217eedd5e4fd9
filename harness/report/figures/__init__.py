"""Figures of a report: the figure model, evidence rules, per-defense panels and the drawers."""

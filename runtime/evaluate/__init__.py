"""Evaluating a model: held-out sets (text and grids), adaptive depth against full depth, and the
lm-evaluation-harness model."""

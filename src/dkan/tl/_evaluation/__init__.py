"""Evaluation: metrics, cross-validation, baselines, fold summaries."""

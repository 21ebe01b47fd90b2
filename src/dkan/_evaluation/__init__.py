"""Evaluation of predictions: metrics per gene and summary, fold summaries, baselines."""

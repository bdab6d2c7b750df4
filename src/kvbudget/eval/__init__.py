"""Evaluation: task files, generators (ours and RULER), loaders of published datasets, metrics,
runner, reports."""
